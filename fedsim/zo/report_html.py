"""report.html of a zeroth-order run: its own sections (threat model, objective against queries, attacks per round,
how to read them, caveats) and its own leaderboard.csv, instead of the gradient-inversion report's leaderboard,
frontier, rounds and galleries, which do not apply (:func:`fedsim.report.html.render_report` dispatches here once).

The texts and cells come from :mod:`fedsim.zo.report`, so summary.md and report.html say the same; every number
tolerates an absent, null or NaN value.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by CLIs, CI and Ray drivers
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.report.gallery import data_uri  # noqa: E402
from fedsim.report.page import esc, figure, table  # noqa: E402
from fedsim.zo.report import (  # noqa: E402
    OBJECTIVE,
    QUERIES,
    RunInfo,
    attack_cells,
    attack_reading,
    attack_summary,
    attacked_rows,
    defense_label,
    no_attack_reason,
    objective_cells,
    objective_line,
    run_notes,
    success_line,
    threat_model,
    value,
)


def objective_curve(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> bool:
    """Global objective F against cumulative queries, one line per label (method or setting -> history rows);
    rows without a finite F or query count are left out. False (nothing written) when no row is left."""
    drawn = {k: [(value(h, QUERIES), value(h, OBJECTIVE)) for h in v] for k, v in curves.items()}
    drawn = {k: [(q, f) for q, f in v if q is not None and f is not None] for k, v in drawn.items()}
    drawn = {k: v for k, v in drawn.items() if v}
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    for label, pts in drawn.items():
        ax.plot([q for q, _ in pts], [f for _, f in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("queries (all clients, cumulative)")
    ax.set_ylabel("global objective F(x)")
    ax.set_title("Zeroth-order optimisation: lower is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def how_to_read(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str:
    """The 'How to read this' box of a zeroth-order run (the attack scores' reading when an attack ran)."""
    items = ["<b>F(x)</b>: the global objective (mean of the clients' private f_i, weighted) at the global point "
             "after each round, computed by the evaluator; lower is better. The x-axis counts the points of f_i the "
             "clients evaluated (all phases), the cost a zeroth-order method pays instead of gradients.",
             *([esc(attack_reading(info, history))] if attacked_rows(history) else []),
             "<b>\u2014 (reason)</b>: a value that is undefined or was not recorded, with why."]
    lis = "".join(f"<li>{i}</li>" for i in items)
    return f'<section id="how-to-read" class="howto"><h2>How to read this</h2><ul>{lis}</ul></section>'


def _threat_section(info: RunInfo) -> str:
    lines = threat_model(info)
    lis = "".join(f"<li>{esc(t)}</li>" for t in lines[1:])
    return (f'<section id="threat-model"><h2>Threat model</h2><p>{esc(lines[0])}</p>'
            f"<p>What each message of this run reveals to it:</p><ul>{lis}</ul></section>")


def _objective_section(info: RunInfo, history: Sequence[Mapping[str, Any]], assets: Path) -> str:
    made = objective_curve({info.method: history}, assets / "zo_objective.png")
    uri = data_uri((assets / "zo_objective.png").read_bytes()) if made else None
    fig = figure(uri, "Global objective F at the global point after each round, against the queries all clients "
                      "spent so far (the server never sees F; the evaluator computes it)." if made else
                 "No round has a finite objective and query count to draw.", "objective against queries")
    line = objective_line(info, history) or "No round finished."
    success = success_line(info, history)
    extra = f'<p><b>{esc(success)}</b></p>' if success else ""
    q_table = table([("round", False), ("F(x)", False), ("queries this round", False), ("queries total", False)],
                    [([esc(c) for c in r], "") for r in objective_cells(history)])
    return (f'<section id="zeroth-order"><h2>Objective and queries</h2><p>{esc(line.replace("`", ""))}</p>{extra}'
            f"{fig}{q_table}</section>")


def _attack_section(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str:
    head, body = attack_cells(history)
    if not head:
        inner = f"<p>{esc(no_attack_reason(info))}</p>"
    else:
        inner = (f"<p>Defense on the messages: {esc(defense_label(info.defenses))}. One row per attacked round.</p>"
                 + table([(t, i == 0) for i, t in enumerate(head)], [([esc(c) for c in r], "") for r in body]))
    return f'<section id="zo-attacks"><h2>What the server learned from the messages</h2>{inner}</section>'


def _notes_section(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str:
    notes = run_notes(info, history)
    if not notes:
        return ""
    lis = "".join(f'<li class="bad">{esc(n)}</li>' for n in notes)
    return f'<section id="caveats"><h2>Caveats</h2><ul>{lis}</ul></section>'


LEADERBOARD_FIELDS = ("attack", "defense", "method", "task", "rounds_attacked", "score", "value", "baseline",
                      "baseline_value", "note")


def leaderboard_rows(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per zeroth-order attack that ran (attack x message defense), its mean score over the attacked rounds
    beside the baseline the server has without the individual message (empty cells: undefined)."""
    rows = attacked_rows(history)
    s = attack_summary(history)
    one = "SecAgg over 1 client hides nothing" if info.secagg and info.clients == 1 else ""
    base = {"defense": defense_label(info.defenses), "method": info.method, "task": info.family,
            "rounds_attacked": len(rows), "note": one}

    def num(key: str) -> float | str:
        v = s.get(key)
        return "" if v is None or v != v else v

    out = []
    if any("zo_extraction_flat_clients" in h for h in rows):
        out.append({**base, "attack": "function extraction", "score": "R2 (fit box)",
                    "value": num("zo_extraction_r2_mean"), "baseline": "R2 aggregate",
                    "baseline_value": num("zo_extraction_r2_global_mean")})
        out.append({**base, "attack": "function extraction", "score": "RMSE (fit box)",
                    "value": num("zo_extraction_rmse_mean"), "baseline": "RMSE aggregate",
                    "baseline_value": num("zo_extraction_rmse_global_mean")})
    if any("zo_label_set_chance" in h for h in rows):
        for key, what in (("zo_label_set_accuracy_mean", "accuracy (surrogate)"),
                          ("zo_label_set_step_accuracy_mean", "accuracy (local step)")):
            chance = num("zo_label_set_chance")
            meaningless = isinstance(chance, float) and chance >= 1.0 - 1e-12
            if num(key) != "":
                out.append({**base, "attack": "label-set inference", "score": what, "value": num(key),
                            "baseline": "chance", "baseline_value": chance,
                            "note": "; ".join(filter(None, [one, "meaningless: chance 1.0" if meaningless else ""]))})
    return out


def _leaderboard_section(info: RunInfo, history: Sequence[Mapping[str, Any]], path: Path, csv_name: str) -> str:
    rows = leaderboard_rows(info, history)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LEADERBOARD_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if not rows:
        return ""
    shown = LEADERBOARD_FIELDS[:2] + LEADERBOARD_FIELDS[5:]
    head = [(t, t in ("attack", "defense", "score", "baseline")) for t in shown]
    cells = [([esc(r[k] if isinstance(r[k], str) else f"{r[k]:.4g}") for k in shown], "") for r in rows]
    return (f'<section id="leaderboard"><h2>Leaderboard</h2><p class="note">Attack x message defense, mean over '
            f"the attacked rounds; also in {esc(csv_name)}.</p>{table(head, cells)}</section>")


def zo_report_sections(scenario: Mapping[str, Any], metrics: Mapping[str, Any], assets: Path,
                       csv_name: str) -> list[str]:
    """The report.html sections of a zeroth-order run after its header, from its resolved scenario.yaml and
    metrics.json; writes ``zo_objective.png`` and ``leaderboard.csv`` into ``assets``."""
    info = RunInfo.from_scenario(scenario)
    history = [h for h in metrics.get("utility") or [] if isinstance(h, Mapping)]
    board = _leaderboard_section(info, history, assets / "leaderboard.csv", csv_name)
    from fedsim.zo.summary import failure_text

    failed = "".join(f'<p class="bad"><b>Error: {esc(failure_text(f))}</b></p>'
                     for f in metrics.get("client_failures") or [] if isinstance(f, Mapping))
    stopped = f'<section id="zo-failure"><h2>Run stopped</h2>{failed}</section>' if failed else ""
    return [stopped, _threat_section(info), _notes_section(info, history), _objective_section(info, history, assets),
            _attack_section(info, history), board, how_to_read(info, history)]
