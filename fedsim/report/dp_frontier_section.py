"""The report's DP frontier section: utility against epsilon (log scale) per DP method, and its table.

Shown only for a bench with some DP method at two or more epsilons (:func:`fedsim.report.dp_frontier.has_frontier`).
Left panel: final test accuracy (or test loss) against epsilon, one line per method, error bars = std
over seeds; client-level methods (central DP) dashed, since their epsilon protects a client, not an
example. Right panel: the strongest attack's mean PSNR at each point. Methods without DP are drawn as
horizontal reference lines (their utility and leakage at epsilon = infinity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from fedsim.report.dp_frontier import (  # noqa: E402
    COLUMNS,
    TEXT_LEAKAGE,
    FrontierRow,
    frontier_rows,
    has_frontier,
    row_cells,
    utility_title,
    write_frontier_csv,
)
from fedsim.report.frontier import MARKERS  # noqa: E402
from fedsim.report.gallery import data_uri  # noqa: E402
from fedsim.report.loading import Source  # noqa: E402
from fedsim.report.page import esc, figure, table  # noqa: E402

CSV_NAME = "dp_frontier.csv"
FIGURE_NAME = "dp_frontier.png"


def _methods(rows: Sequence[FrontierRow]) -> tuple[list[str], list[FrontierRow]]:
    """DP methods that have a point to draw (in row order), and the non-DP rows with a utility."""
    dp = list(dict.fromkeys(r.method for r in rows if r.dp and r.x is not None and r.utility is not None))
    plain = [r for r in rows if not r.dp and r.utility is not None]
    return dp, plain


def dp_frontier_plot(rows: Sequence[FrontierRow], path: Path) -> bool:
    """Draw the two panels into ``path``; False (nothing written) when there is no frontier."""
    if not has_frontier(rows):
        return False
    methods, plain = _methods(rows)
    colours = plt.get_cmap("tab10")
    fig, (ax_u, ax_p) = plt.subplots(1, 2, figsize=(10.5, 4.3))
    diverged_drawn = False
    for i, (method, marker) in enumerate(zip(methods, itertools.cycle(MARKERS), strict=False)):
        points = sorted((r for r in rows if r.method == method and r.dp and r.x is not None and r.utility is not None),
                        key=lambda r: r.x)
        client = any(r.level == "client" for r in points)
        dodge = 1.025 ** (i - (len(methods) - 1) / 2)  # methods with equal values (same seeds) stay visible
        xs = [r.x * dodge for r in points]
        style = {"color": colours(i % 10), "marker": marker, "ls": "--" if client else "-", "ms": 6, "capsize": 3,
                 "label": method + (" (client-level \u03b5)" if client else "")}
        ax_u.errorbar(xs, [r.utility.mean for r in points],
                      yerr=[r.utility.std or 0 for r in points], **style)
        bad = [(x, r) for x, r in zip(xs, points, strict=True) if r.diverged]
        if bad:  # a diverged seed: the point is no trade-off, so it is crossed out in red
            ax_u.scatter([x for x, _ in bad], [r.utility.mean for _, r in bad], marker="x", s=110, color="red",
                         zorder=5, label="training diverged (a seed)" if not diverged_drawn else None)
            diverged_drawn = True
        leaks = [(x, r) for x, r in zip(xs, points, strict=True) if r.psnr is not None]
        if leaks:
            ax_p.errorbar([x for x, _ in leaks], [r.psnr.mean for _, r in leaks],
                          yerr=[r.psnr.std or 0 for _, r in leaks], **style)
    for j, r in enumerate(plain):
        grey = str(0.2 + 0.15 * (j % 4))
        ax_u.axhline(r.utility.mean, color=grey, ls=":", lw=1.2, label=f"{r.method} (no DP)")
        if r.psnr is not None:
            ax_p.axhline(r.psnr.mean, color=grey, ls=":", lw=1.2, label=f"{r.method} (no DP)")
    drawn = [r for r in rows if r.dp and r.x is not None and r.utility is not None]
    ticks = sorted({float(f"{r.target if r.target is not None else r.x:.2g}") for r in drawn})  # the budgets
    for ax in (ax_u, ax_p):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # not powers of ten
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("\u03b5 achieved (\u03b4 as configured; log scale)")
        ax.grid(alpha=0.3, which="both")
    ax_u.set_ylabel(utility_title(rows))
    ax_u.set_title("Utility at each privacy budget")
    keys = {r.leak_key for r in rows if r.psnr is not None}
    ax_p.set_ylabel("best attack's mean PSNR, dB (lower is better)" if keys <= {"psnr_mean"} else
                    f"best attack's {' / '.join(TEXT_LEAKAGE.get(k, k) for k in sorted(keys))} (lower is better)")
    ax_p.set_title("What the curious server reconstructs")
    ax_u.legend(fontsize=7.5, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def dp_frontier_section(source: Source, assets: Path, shown_dir: str) -> str:
    """The section's HTML (figure + table; ``dp_frontier.csv`` written to ``assets``, which the page names
    ``shown_dir``), or "" without a frontier."""
    if source.kind != "bench":
        return ""
    rows = frontier_rows(source.cells)
    if not has_frontier(rows):
        return ""
    write_frontier_csv(rows, assets / CSV_NAME)
    made = dp_frontier_plot(rows, assets / FIGURE_NAME)
    uri = data_uri((assets / FIGURE_NAME).read_bytes()) if made else None
    caption = ("Left: final utility against the achieved \u03b5 (log scale; methods dodged sideways by a few per "
               "cent so equal values stay visible), one line per DP method, mean over seeds, bars = std; dashed lines "
               "are client-level \u03b5 (central DP), not comparable with sample-level "
               "\u03b5 point for point; dotted horizontal lines are runs without DP. Right: the strongest attack's "
               "mean PSNR at each point (text attacks: exact sequences, else ROUGE-L, else bag recall). "
               "A red cross: a seed of that point's training diverged (see its note).")
    left = {"method", "level", "best attack", "note"}
    head = [(c, c in left) for c in COLUMNS]
    body = []
    for r in rows:
        cells = [esc(c) for c in row_cells(r)]
        if r.pareto:
            cells[COLUMNS.index("front")] = '<span class="tag">front</span>'
        if r.note:
            cells[-1] = f'<span class="bad">{esc(r.note)}</span>'
        body.append((cells, ""))
    note = ("One row per method and target \u03b5 (methods solve their noise for the target over the planned run). "
            "\u03b5 Opacus is the figure the defense reported, dp-acc RDP / PLD the same history re-accounted with "
            "Google's dp_accounting; each is the max over seeds (per client for sample-level DP). <i>level</i>: "
            "sample = one example of a client, client = a client's whole data. <i>\u03b5 vs server</i>: what is left "
            "against the curious server itself (inf when it sees un-noised messages: central DP, DIFF2 with central "
            "noise). Utility and time (the federation's "
            "wall time, attacks excluded; it includes each client's one-off noise calibration when a method solves "
            "its noise from the target, seconds on one core, so it is not a per-step cost) are mean &plusmn; std "
            "over seeds; <i>time &times; dp_sgd</i> divides by dp_sgd's time at the same target. <i>front</i>: "
            "no other row of the same level has both a lower "
            f"\u03b5 and a better utility. A row that missed its target (achieved \u03b5 above it by more than "
            "the solver's tolerance, 0.01 relative, or below it by more than 2 %), or where the training of "
            "some seed diverged (never on the front; a non-finite utility is left out of its mean), says so in "
            f"<i>note</i>. Also in "
            f"<code>{esc(shown_dir)}/{CSV_NAME}</code>.")
    return (f'<section id="dp-frontier"><h2>DP methods at matched \u03b5</h2><p class="note">{note}</p>'
            f"{figure(uri, caption, 'utility against epsilon per DP method')}{table(head, body)}</section>")
