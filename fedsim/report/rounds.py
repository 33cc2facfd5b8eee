"""Leakage over rounds beside accuracy over rounds, for a benchmark (many cells, one line each).

A single run reuses :func:`fedsim.report.leakage.leakage_plot` and :func:`fedsim.report.figures.utility_curve`;
a benchmark draws, from each leaderboard row's first ok repeat, its attack's PSNR (text: ROUGE-L, or bag recall for
bag-only attacks; :func:`fedsim.report.leakage.plotted_key`) per attacked round
(the ``leakage`` curve of its metrics.json) on the left and its model's test accuracy per round on the right.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsim.errors import FedsimError  # noqa: E402
from fedsim.report.frontier import MARKERS, setting_label  # noqa: E402
from fedsim.report.leakage import plotted_key  # noqa: E402
from fedsim.report.loading import load_metrics  # noqa: E402
from fedsim.report.tables import LeaderRow  # noqa: E402

MAX_LINES = 12  # beyond this a line plot is unreadable: the leaderboard has the rest


def bench_rounds_plot(rows: Sequence[LeaderRow], path: Path) -> bool:
    """Two panels (leakage per round: PSNR, or a text run's ROUGE-L / bag recall; test accuracy per round, or test
    loss for a regression cell, which has no accuracy); False when no cell has a run directory."""
    leak_lines, acc_lines, seen_settings, keys = [], [], set(), set()
    curves: list[tuple[str, str, list[dict]]] = []
    for row in rows:
        cell = next((c for c in row.cells if c.ok and c.run_dir is not None), None)
        if cell is None:
            continue
        try:
            metrics = load_metrics(cell.run_dir)
        except FedsimError:
            continue
        setting = setting_label(row)
        curves.append((row.attack, setting, metrics.get("leakage") or []))
        history = metrics.get("utility") or []
        key = "test_accuracy" if any("test_accuracy" in h for h in history) else "test_loss"  # regression: loss
        evaluated = [h for h in history if key in h]
        if evaluated and setting not in seen_settings and len(acc_lines) < MAX_LINES:
            seen_settings.add(setting)
            acc_lines.append((setting, [h["round"] for h in evaluated], [h[key] for h in evaluated]))
            keys.add(key)
    chosen = plotted_key([r for _, _, curve in curves for r in curve])  # PSNR, else text ROUGE-L / bag recall, ...
    leak_key, axis_label = (chosen[0], chosen[2]) if chosen else ("psnr_mean", "reconstruction PSNR (dB)")
    for attack, setting, curve in curves:
        points = [r for r in curve if isinstance(r.get(leak_key), int | float)]
        if points and len(leak_lines) < MAX_LINES:
            leak_lines.append((attack, setting, [r["round"] for r in points], [r[leak_key] for r in points]))
    if not leak_lines and not acc_lines:
        return False
    settings = sorted({s for _, s, _, _ in leak_lines} | {s for s, _, _ in acc_lines})
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    colour = {s: cmap(i % cmap.N) for i, s in enumerate(settings)}  # same colours as the frontier
    attacks = sorted({a for a, _, _, _ in leak_lines})
    marker = dict(zip(attacks, itertools.cycle(MARKERS), strict=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for attack, setting, xs, ys in leak_lines:
        left.plot(xs, ys, marker=marker[attack], color=colour[setting], label=f"{attack} / {setting}")
    left.set_title("Leakage over rounds")
    left.set_xlabel("round")
    left.set_ylabel(axis_label)
    for setting, xs, ys in acc_lines:
        right.plot(xs, ys, marker=".", color=colour[setting], label=setting)
    what = "test accuracy" if keys == {"test_accuracy"} else "test loss" if keys == {"test_loss"} else (
        "test accuracy (classification) / test loss (regression)")
    right.set_title(f"{what[0].upper()}{what[1:]} of the global model")
    right.set_xlabel("round")
    right.set_ylabel(what)
    if keys == {"test_accuracy"}:
        right.set_ylim(0, 1)
    for ax, lines in ((left, leak_lines), (right, acc_lines)):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = [x for line in lines for x in line[-2]]
        if xs:
            ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        if lines:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
