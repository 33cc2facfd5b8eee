"""Client participation in a run: every round that aggregated fewer clients than it asked for, and why.

Reads the per-round ``clients_requested`` / ``clients_aggregated`` / ``clients_failed`` fields of the
history rows (metrics.json ``utility``) and the ``client_failures`` list ({round, client, reason}),
both written by the federation (policy: :mod:`fedsim.simulation.participation`). The same facts go to
summary.md (:func:`participation_markdown`) and report.html (:func:`participation_section`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.report.page import esc, table


def short_rounds(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Training rounds whose aggregate holds fewer clients than were requested."""
    return [h for h in history if "clients_requested" in h
            and h.get("clients_aggregated", 0) < h["clients_requested"]]


def _verdict(history: Sequence[Mapping[str, Any]]) -> str | None:
    """One sentence on participation, or None when the rows carry no participation fields (older runs)."""
    rounds = [h for h in history if "clients_requested" in h]
    if not rounds:
        return None
    short = short_rounds(history)
    if not short:
        return f"Every one of the {len(rounds)} training round(s) aggregated all the clients it requested."
    worst = min(short, key=lambda h: h.get("clients_aggregated", 0))
    refused = [h for h in short if h.get("clients_refused", 0) and h.get("clients_aggregated", 0) == 0]
    which = ", ".join(f"{h['round']:.0f}" for h in refused)
    note = (f" In {len(refused)} round(s) (round {which}) every client "
            "refused the server's model (a client-side check): nothing was aggregated and the global model stayed "
            "as it was." if refused else "")
    return (f"{len(short)} of {len(rounds)} training round(s) aggregated fewer clients than requested (fewest: "
            f"{worst.get('clients_aggregated', 0):.0f} of {worst['clients_requested']:.0f} in round "
            f"{worst['round']:.0f}); the failed clients' updates are not in those rounds' aggregates.{note}")


def participation_markdown(history: Sequence[Mapping[str, Any]],
                           failures: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The summary.md lines: a verdict and, when clients failed, a table of rounds, clients and reasons."""
    verdict = _verdict(history)
    if verdict is None and not failures:
        return []
    lines = ["## Participation", "", verdict or "", ""]
    if failures:
        lines += ["| round | client | reason |", "|---|---|---|"]
        lines += [f"| {f.get('round')} | {f.get('client')} | {str(f.get('reason', '')).replace('|', '/')} |"
                  for f in failures]
        lines.append("")
    return lines


def participation_section(metrics: Mapping[str, Any]) -> str:
    """The report.html section of a run (empty when metrics.json predates participation records)."""
    history = metrics.get("utility") or []
    failures = metrics.get("client_failures") or []
    verdict = _verdict(history)
    if verdict is None and not failures:
        return ""
    cls = "bad" if short_rounds(history) or failures else "note"
    body = f'<p class="{cls}">{esc(verdict or "")}</p>'
    if failures:
        rows = [([esc(f.get("round")), esc(f.get("client")), esc(f.get("reason"))], "") for f in failures]
        body += table([("round", False), ("client", False), ("reason", True)], rows)
    return f'<section id="participation"><h2>Client participation</h2>{body}</section>'
