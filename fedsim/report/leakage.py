"""Leakage over rounds: per attack and round, the mean of each leakage metric over attacked clients.

This is the curve that shows how much an update leaks as the model trains (Issue: leakage over
rounds), written into metrics.json beside the utility curve and drawn with it in one figure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.headline import LEAKAGE_KEYS  # noqa: E402
from fedsim.outcomes import was_not_attacked  # noqa: E402

CURVE_METRICS = tuple(k for k in LEAKAGE_KEYS if k != "psnr_best")  # image, model-inversion and text (one registry)


def leakage_curve(outcomes: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows {attack, attack_index, round, clients, failed, not_attacked (when any), <metric>: mean over clients}
    sorted by round; ``failed`` counts attack failures only, never a target without an update (not attacked)."""
    groups: dict[tuple[int, str, int], list[Any]] = defaultdict(list)
    for o in outcomes:
        groups[(o.attack_index, o.attack, o.round)].append(o)
    rows = []
    for (index, name, rnd), members in sorted(groups.items()):
        skipped = sum(1 for o in members if was_not_attacked(o.failed))  # no update to attack: not a failure
        row: dict[str, Any] = {"attack": name, "attack_index": index, "round": rnd, "clients": len(members),
                               "failed": sum(1 for o in members if o.failed) - skipped}
        if skipped:
            row["not_attacked"] = skipped
        for key in CURVE_METRICS:
            values = [o.metrics[key] for o in members if not o.failed and isinstance(o.metrics.get(key), int | float)]
            if values:
                row[key] = mean(values)
        rows.append(row)
    return rows


#: What the left axis shows: PSNR of image attacks, else ROUGE-L of text attacks that return sequences, else the
#: bag recall of bag-only text attacks, else the accuracy of model inversion (``every: k`` on gmi); the first of
#: these with a curve. Keys on a 0..1 scale get that axis.
PLOTTED = (("psnr_mean", "PSNR", "reconstruction PSNR (dB)"),
           ("rougeL_mean", "ROUGE-L", "recovered text: mean ROUGE-L (token ids)"),
           ("token_set_recall", "bag recall", "recovered bag of tokens: recall"),
           ("mi_accuracy", "MI accuracy", "model-inversion accuracy"))
UNIT_SCALE = frozenset({"rougeL_mean", "token_set_recall", "mi_accuracy"})


def plotted_key(curve: Sequence[dict[str, Any]], min_points: int = 1) -> tuple[str, str, str] | None:
    """``(key, short name, axis label)`` of the first :data:`PLOTTED` metric that some attack's curve has in at
    least ``min_points`` rounds (None: none has)."""
    for key, short, label in PLOTTED:
        if any(len(rows) >= min_points for rows in _series(curve, key).values()):
            return key, short, label
    return None


def _series(curve: Sequence[dict[str, Any]], key: str) -> dict[tuple[int, str], list[dict[str, Any]]]:
    series: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in curve:
        if key in row:
            series[(row["attack_index"], row["attack"])].append(row)
    return series


def leakage_plot(curve: Sequence[dict[str, Any]], history: Sequence[dict[str, float]], path: Path) -> bool:
    """Leakage of each attack per round (left axis: the first of :data:`PLOTTED` with a curve: PSNR, text ROUGE-L or
    bag recall, or model-inversion accuracy) beside the global model's test accuracy (right axis)."""
    chosen = plotted_key(curve, min_points=2)
    if chosen is None:  # a curve needs at least two attacked rounds
        return False
    key, short, axis_label = chosen
    series = _series(curve, key)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (_, name), rows in sorted(series.items()):
        ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", label=f"{name} {short}")
    ax.set_xlabel("round")
    ax.set_ylabel(axis_label)
    if key in UNIT_SCALE:
        ax.set_ylim(0, 1.05)
    evaluated = [h for h in history if "test_accuracy" in h]
    if evaluated:
        ax2 = ax.twinx()
        ax2.plot([h["round"] for h in evaluated], [h["test_accuracy"] for h in evaluated], color="gray",
                 ls="--", label="test accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("test accuracy")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Leakage and utility over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
