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

from fedsim.outcomes import was_not_attacked  # noqa: E402
from fedsim.recovery import FRAC_EXACT_KEY  # noqa: E402

CURVE_METRICS = ("psnr_mean", FRAC_EXACT_KEY, "ssim_mean", "lpips_mean", "label_acc", "mi_accuracy",
                 "knn_distance")  # frac: the share of exact images, the headline of analytic attacks


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


#: What the left axis shows: PSNR of update attacks, else the accuracy of model inversion (``every: k`` on gmi).
PLOTTED = (("psnr_mean", "PSNR", "reconstruction PSNR (dB)"),
           ("mi_accuracy", "MI accuracy", "model-inversion accuracy"))


def _series(curve: Sequence[dict[str, Any]], key: str) -> dict[tuple[int, str], list[dict[str, Any]]]:
    series: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in curve:
        if key in row:
            series[(row["attack_index"], row["attack"])].append(row)
    return series


def leakage_plot(curve: Sequence[dict[str, Any]], history: Sequence[dict[str, float]], path: Path) -> bool:
    """Leakage of each attack per round (left axis: PSNR, or model-inversion accuracy when no update attack
    has a curve) beside the global model's test accuracy (right axis)."""
    candidates = [(key, short, label, _series(curve, key)) for key, short, label in PLOTTED]
    chosen = [c for c in candidates if any(len(rows) >= 2 for rows in c[3].values())]
    if not chosen:  # a curve needs at least two attacked rounds
        return False
    key, short, axis_label, series = chosen[0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (_, name), rows in sorted(series.items()):
        ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", label=f"{name} {short}")
    ax.set_xlabel("round")
    ax.set_ylabel(axis_label)
    if key == "mi_accuracy":
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
