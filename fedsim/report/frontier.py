"""The privacy-utility frontier: reconstruction PSNR (leakage; for text attacks mean ROUGE-L, or bag recall for
bag-only ones: :data:`FRONTIER_LEAKAGE`) against the final test accuracy.

One point per leaderboard row (attack x defense x params, mean over repeats, error bars = std), one
marker shape per attack, one colour per defense setting, epsilon written beside DP points. A defender
wants high accuracy and low leakage, and must assume the strongest attack: the front links the defense
settings whose worst-case PSNR (max over attacks) no other setting beats at equal or higher accuracy
(Pareto optimality).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.report.tables import LeaderRow, params_label  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: (key, axis label) of the leakage axis: the first that some row with a test accuracy has (higher leaks more).
FRONTIER_LEAKAGE = (("psnr_mean", "reconstruction PSNR, dB (leakage, lower is better)"),
                    ("rougeL_mean", "recovered text: mean ROUGE-L (leakage, lower is better)"),
                    ("token_set_recall", "recovered bag of tokens: recall (leakage, lower is better)"))


def frontier_key(rows: Sequence[LeaderRow]) -> tuple[str, str] | None:
    """The leakage axis :func:`frontier_plot` draws for ``rows`` (None: no row has a leakage and an accuracy)."""
    for key, label in FRONTIER_LEAKAGE:
        if any(r.value(key) is not None and r.value("test_accuracy") is not None for r in rows):
            return key, label
    return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, leakage) points that no other point dominates (accuracy >= and leakage <=,
    one strictly), ordered by accuracy."""
    front = []
    for i, (acc, leak) in enumerate(points):
        dominated = any(a >= acc and lk <= leak and (a > acc or lk < leak)
                        for j, (a, lk) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def setting_label(row: LeaderRow) -> str:
    """The defense setting a row belongs to: defense name plus its sweep parameters."""
    # Bench labels already name swept defense params (``dp_sgd(noise_multiplier=1.0)``): add only the others.
    extra = params_label({k: v for k, v in row.params.items() if f"{k.rsplit('.', 1)[-1]}=" not in row.defense})
    return f"{row.defense} ({extra})" if extra else row.defense


def frontier_plot(rows: Sequence[LeaderRow], path: Path) -> bool:
    """Draw the frontier of the rows that have both a leakage metric (:func:`frontier_key`: PSNR, else a text run's
    ROUGE-L or bag recall) and a test accuracy; False when none has."""
    chosen = frontier_key(rows)
    if chosen is None:
        return False
    key, axis_label = chosen
    points = [r for r in rows if r.value(key) is not None and r.value("test_accuracy") is not None]
    attacks = sorted({r.attack for r in points})
    settings = sorted({setting_label(r) for r in points})
    marker = dict(zip(attacks, itertools.cycle(MARKERS), strict=False))
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    colour = {s: cmap(i % cmap.N) for i, s in enumerate(settings)}
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for r in points:
        acc, psnr = r.stats["test_accuracy"], r.stats[key]
        ax.errorbar(acc.mean, psnr.mean, xerr=acc.std or 0, yerr=psnr.std or 0, fmt=marker[r.attack], ms=8,
                    color=colour[setting_label(r)], mec="black", mew=0.6, elinewidth=0.8, capsize=2, alpha=0.9)
        eps = r.value("epsilon")
        if eps is not None:
            ax.annotate(f"\u03b5={eps:.3g}", (acc.mean, psnr.mean), xytext=(6, 5), textcoords="offset points",
                        fontsize=8)
    worst: dict[str, list[LeaderRow]] = defaultdict(list)
    for r in points:
        worst[setting_label(r)].append(r)
    labels = sorted(worst)
    summary = [(mean(x.value("test_accuracy") for x in worst[s]), max(x.value(key) for x in worst[s]))
               for s in labels]
    front = pareto_front(summary)
    if len(front) >= 2:
        ax.plot([summary[i][0] for i in front], [summary[i][1] for i in front], color="0.35", ls="--", lw=1.2,
                zorder=0, label="Pareto front (worst-case attack)")
    elif front:
        ax.scatter([summary[front[0]][0]], [summary[front[0]][1]], s=260, facecolors="none", edgecolors="0.35",
                   ls="--", label="Pareto-optimal setting")
    handles = [plt.Line2D([], [], ls="", marker=marker[a], color="0.5", mec="black", ms=7, label=a) for a in attacks]
    handles += [plt.Line2D([], [], ls="", marker="s", color=colour[s], ms=8, label=s) for s in settings]
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("final test accuracy (utility, higher is better)")
    ax.set_ylabel(axis_label)
    ax.set_title("Privacy-utility frontier")
    ax.grid(alpha=0.3)
    accs = [r.value("test_accuracy") for r in points]
    lo, hi = max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.05)
    if hi - lo < 0.2:
        lo, hi = max(0.0, (lo + hi) / 2 - 0.1), min(1.0, (lo + hi) / 2 + 0.1)
    ax.set_xlim(lo - 0.01, hi + 0.01)
    if key == "psnr_mean":
        top = max(r.value(key) + (r.stats[key].std or 0) for r in points)
        ax.set_ylim(0, max(top + 2, 24))
        ax.axhline(20, color="tab:red", lw=0.8, ls=":", zorder=0)
        ax.text(lo, 20.3, "~20 dB: usually recognisable (32x32)", fontsize=7, color="tab:red", va="bottom")
    else:  # text metrics are shares in [0, 1]
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
