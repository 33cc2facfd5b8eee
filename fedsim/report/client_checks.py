"""Client-side checks' verdicts in a run: which clients flagged the model they received, in which round and where.

A client-side check (a defense's ``inspect_model``, e.g. ``model_check``) that flags a model instead of refusing it
reports per client and round, in metrics.json ``client_metrics[round][client]``: ``<check>_flagged`` (0/1) and,
optionally, ``<check>_layer`` (index of the first abnormal tensor in the agreed ``state_dict``) and further
``<check>_*`` numbers (e.g. ``model_check_norm_ratio``). For a weights-only manipulation the flag is the check's
whole output, so summary.md (:func:`client_checks_markdown`) and report.html (:func:`client_checks_section`) show
it, and the malicious-server table (:mod:`fedsim.report.manipulation`) gives each manipulated round's count
(:func:`flag_cell`). Keys are read generically (any ``*_flagged`` metric), so no defense plug-in is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsim.report.page import esc, table

SUFFIX = "_flagged"
ClientMetrics = Mapping[Any, Mapping[Any, Mapping[str, Any]]]  # round -> client -> metric -> value


@dataclass
class RoundFlags:
    """One check's verdicts in one round: clients it ran on, and per flagged client its layer and numbers."""

    round: int
    check: str
    checked: int = 0
    flagged: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> its <check>_* metrics


def round_flags(client_metrics: ClientMetrics | None) -> list[RoundFlags]:
    """Every (round, check) with at least one client that ran the check, sorted by round then check name."""
    out: dict[tuple[int, str], RoundFlags] = {}
    for rnd, per in (client_metrics or {}).items():
        for client, metrics in (per or {}).items():
            for key, value in (metrics or {}).items():
                if not key.endswith(SUFFIX) or not isinstance(value, int | float):
                    continue
                check = key[: -len(SUFFIX)]
                row = out.setdefault((int(rnd), check), RoundFlags(int(rnd), check))
                row.checked += 1
                if value:
                    row.flagged[int(client)] = {k[len(check) + 1:]: float(v) for k, v in metrics.items()
                                                if k.startswith(check + "_") and k != key
                                                and isinstance(v, int | float)}
    return [out[k] for k in sorted(out)]


def flag_cell(client_metrics: ClientMetrics | None, round_num: int) -> str:
    """The malicious-server table's cell for one round: ``2 of 4 (model_check, layer 6)``, ``0 of 4``, or ``-``
    when no client ran a check that round (none configured, or every client refused the model first)."""
    rows = [r for r in round_flags(client_metrics) if r.round == round_num]
    if not rows:
        return "-"
    parts = []
    for r in rows:
        layers = sorted({int(m["layer"]) for m in r.flagged.values() if "layer" in m and m["layer"] >= 0})
        where = f" ({r.check}, layer {', '.join(map(str, layers))})" if layers else (
            f" ({r.check})" if r.flagged else "")
        parts.append(f"{len(r.flagged)} of {r.checked}{where}")
    return "; ".join(parts)


def _verdict(rows: list[RoundFlags]) -> str:
    checks = sorted({r.check for r in rows})
    flagged = [r for r in rows if r.flagged]
    total = sum(len(r.flagged) for r in rows)
    checked = sum(r.checked for r in rows)
    if not flagged:
        return (f"{', '.join(checks)}: no client flagged the model it received ({checked} client-round(s) checked, "
                "rounds of refused models not counted).")
    which = ", ".join(str(r.round) for r in flagged)
    return (f"{', '.join(checks)}: {total} of {checked} client-round(s) checked flagged the model they received "
            f"(round {which}); a flag reports abnormal weights and the client trained anyway (action: flag).")


def _rows(rows: list[RoundFlags]) -> list[list[str]]:
    out = []
    for r in rows:
        for client, m in sorted(r.flagged.items()):
            layer = m.get("layer")
            numbers = ", ".join(f"{k} {v:.3g}" for k, v in sorted(m.items()) if k != "layer")
            out.append([str(r.round), str(client), r.check,
                        "-" if layer is None or layer < 0 else f"{layer:.0f}", numbers])
    return out


HEAD = ("round", "client", "check", "first abnormal tensor (state_dict index)", "numbers")


def client_checks_markdown(client_metrics: ClientMetrics | None) -> list[str]:
    """The summary.md lines: a verdict and one row per flagged (round, client); none when no client ran a check."""
    rows = round_flags(client_metrics)
    if not rows:
        return []
    lines = ["## Client-side model check", "", _verdict(rows), ""]
    flagged = _rows(rows)
    if flagged:
        lines += ["| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in flagged]
        lines.append("")
    return lines


def client_checks_section(metrics: Mapping[str, Any]) -> str:
    """The report.html section of a run (empty when no client ran a check)."""
    rows = round_flags(metrics.get("client_metrics"))
    if not rows:
        return ""
    flagged = _rows(rows)
    body = f'<p class="{"bad" if flagged else "note"}">{esc(_verdict(rows))}</p>'
    if flagged:
        body += table([(t, t == "numbers") for t in HEAD], [([esc(c) for c in cells], "") for cells in flagged])
    return f'<section id="client-checks"><h2>Client-side model check</h2>{body}</section>'
