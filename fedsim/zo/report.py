"""The zeroth-order part of summary.md and report.html: the global objective against queries, the query counts per
round and what the curious server learned from the messages (:mod:`fedsim.zo.attacks`).

Input is the run's history rows (metrics.json ``utility``), one per round. Keys read (all optional except
``round``; a row without them is skipped):

* :data:`OBJECTIVE` the global objective F at the round's resulting point x_{r+1} (evaluator side; never shown to
  the server); an optional row with ``round`` 0 holds F(x0) with 0 queries;
* :data:`QUERIES_ROUND` queries spent by all clients in the round (safeguard replies included), :data:`QUERIES`
  the cumulative count;
* the attack scores of :func:`fedsim.zo.attacks.score_round` in the rounds that were attacked.

Entry points for the run writer: :func:`zo_markdown` (summary.md lines), :func:`zo_section` (report.html section,
figure drawn into the assets folder) and :func:`objective_curve` (the PNG alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by CLIs, CI and Ray drivers
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.report.gallery import data_uri  # noqa: E402
from fedsim.report.page import esc, figure, table  # noqa: E402

OBJECTIVE = "zo_objective"
QUERIES = "zo_queries"
QUERIES_ROUND = "zo_queries_round"

ATTACK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("zo_extraction_r2_mean", "extraction R\u00b2 (fit box)"),
    ("zo_extraction_r2_wide_mean", "R\u00b2 wide box"),
    ("zo_extraction_r2_global_mean", "R\u00b2 aggregate (baseline)"),
    ("zo_extraction_r2_midpoint_mean", "R\u00b2 range midpoint (baseline)"),
    ("zo_extraction_rmse_mean", "RMSE (fit box)"),
    ("zo_extraction_rmse_global_mean", "RMSE aggregate (baseline)"),
    ("zo_label_set_accuracy_mean", "label set acc. (surrogate)"),
    ("zo_label_set_step_accuracy_mean", "label set acc. (local step)"),
    ("zo_label_set_chance", "label set chance"),
)
"""(row key, column title) of the attack table, in order."""

READING = ("Mean over the attacked rounds. Extraction: the server's rebuilt surrogate mu_i against the client's true "
           "f_i at 200 random held-out points in the box the client fitted in (and 10x wider). R\u00b2 1 = a copy of "
           "the private function, <= 0 = no better than the best constant (where f_i hardly varies in the box, e.g. a "
           "piecewise-constant metric, R\u00b2 is negative even for a close copy: read the RMSE beside the "
           "aggregate's). Label set: share of the held/not-held class decisions that are right, beside the exact "
           "chance of a random guess of the same size.")


def _attacked(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [h for h in history if "zo_attacked_clients" in h]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(h[key]) for h in rows if key in h and not math.isnan(float(h[key]))]
    return sum(values) / len(values) if values else float("nan")


def defense_label(defenses: Mapping[str, Any] | None) -> str:
    """A short name for a ``zeroth_order.defenses`` block: the settings that differ from no defense, or 'none'."""
    d = dict(defenses or {})
    parts = [f"{k} {d[k]:g}" for k in ("y_noise", "nu_noise", "ridge") if d.get(k)]
    if d.get("secagg"):
        parts.append("secagg")
    return ", ".join(parts) or "none"


def attack_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The attack scores averaged over the attacked rounds of one run (keys of :data:`ATTACK_COLUMNS`; NaN when a
    score is absent, e.g. label sets on a task without classes)."""
    rows = _attacked(history)
    return {key: _mean(rows, key) for key, _ in ATTACK_COLUMNS}


def _fmt(value: float) -> str:
    """3 decimals, or 3 significant digits for a small (RMSE ~0.005) or huge (a masked share's R^2) value."""
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value == 0 or 0.1 <= abs(value) < 1e4 else f"{value:.3g}"


def attack_table_markdown(settings: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Markdown table, one line per defense setting (label -> that run's history rows): the attack scores averaged
    over its attacked rounds. Empty when no setting was attacked."""
    present = {label: rows for label, rows in settings.items() if _attacked(rows)}
    if not present:
        return []
    lines = ["| defense | " + " | ".join(t for _, t in ATTACK_COLUMNS) + " |",
             "|---|" + "---|" * len(ATTACK_COLUMNS)]
    for label, rows in present.items():
        s = attack_summary(rows)
        lines.append(f"| {label} | " + " | ".join(_fmt(s[k]) for k, _ in ATTACK_COLUMNS) + " |")
    return lines


def _objective_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [h for h in history if OBJECTIVE in h]


def objective_curve(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> bool:
    """Global objective F against cumulative queries, one line per label (method or setting -> history rows);
    False (nothing written) when no row has the objective."""
    drawn = {k: [h for h in v if OBJECTIVE in h and QUERIES in h] for k, v in curves.items()}
    drawn = {k: v for k, v in drawn.items() if v}
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    for label, rows in drawn.items():
        ax.plot([h[QUERIES] for h in rows], [h[OBJECTIVE] for h in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("queries (all clients, cumulative)")
    ax.set_ylabel("global objective F(x)")
    ax.set_title("Zeroth-order optimisation: lower is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _query_lines(history: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = _objective_rows(history)
    if not rows:
        return []
    lines = ["| round | F(x) | queries this round | queries total |", "|---|---|---|---|"]
    for h in rows:
        q_round = h.get(QUERIES_ROUND)
        total = h.get(QUERIES)
        lines.append(f"| {h['round']:.0f} | {h[OBJECTIVE]:.5g} | {'-' if q_round is None else f'{q_round:.0f}'} | "
                     f"{'-' if total is None else f'{total:.0f}'} |")
    return lines


def zo_markdown(history: Sequence[Mapping[str, Any]], method: str, defenses: Mapping[str, Any] | None) -> list[str]:
    """summary.md lines of a zeroth-order run: F first -> last with the queries spent, the per-round table, and the
    attack table with its reading (R^2: 1 = a copy of f_i, <= 0 = no better than a constant)."""
    rows = _objective_rows(history)
    if not rows:
        return []
    first, last = rows[0], rows[-1]
    lines = ["## Zeroth-order optimisation", "",
             f"Method `{method}`: global objective F {first[OBJECTIVE]:.5g} (round {first['round']:.0f}) -> "
             f"{last[OBJECTIVE]:.5g} (round {last['round']:.0f})"
             + (f" after {last[QUERIES]:.0f} queries." if QUERIES in last else "."), "", *_query_lines(history), ""]
    table_lines = attack_table_markdown({defense_label(defenses): history})
    if table_lines:
        lines += ["## What the server learned from the messages", "",
                  READING, "",
                  *table_lines, ""]
    return lines


def zo_section(history: Sequence[Mapping[str, Any]], method: str, defenses: Mapping[str, Any] | None,
               assets: Path) -> str:
    """The report.html section of a zeroth-order run; draws ``zo_objective.png`` into ``assets`` (embedded). Empty
    string when the rows have no objective."""
    rows = _objective_rows(history)
    if not rows:
        return ""
    made = objective_curve({method: history}, assets / "zo_objective.png")
    uri = data_uri((assets / "zo_objective.png").read_bytes()) if made else None
    fig = figure(uri, "Global objective F at the global point after each round, against the queries all clients "
                      "spent so far (the server never sees F; the evaluator computes it).",
                 "objective against queries")
    q_rows = [([esc(f"{h['round']:.0f}"), esc(f"{h[OBJECTIVE]:.5g}"),
                esc(f"{h[QUERIES_ROUND]:.0f}" if QUERIES_ROUND in h else "-"),
                esc(f"{h[QUERIES]:.0f}" if QUERIES in h else "-")], "") for h in rows]
    q_table = table([("round", False), ("F(x)", False), ("queries this round", False), ("queries total", False)],
                    q_rows)
    body = f"<h3>Objective and queries ({esc(method)})</h3>{fig}{q_table}"
    if _attacked(history):
        s = attack_summary(history)
        head = [("defense", True)] + [(t, False) for _, t in ATTACK_COLUMNS]
        cells = [esc(defense_label(defenses))] + [esc(_fmt(s[k])) for k, _ in ATTACK_COLUMNS]
        body += ("<h3>What the server learned from the messages</h3>"
                 f'<p class="note">{esc(READING)}</p>' + table(head, [(cells, "")]))
    return f'<section id="zeroth-order"><h2>Zeroth-order federation</h2>{body}</section>'
