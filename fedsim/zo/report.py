"""The zeroth-order part of summary.md and report.html: who the attacker is, the global objective against queries,
the query counts per round and what the curious server learned from the messages (:mod:`fedsim.zo.attacks`).

Input is the run's history rows (metrics.json ``utility``), one per round, and the resolved scenario's
``zeroth_order`` block (:class:`RunInfo`). Keys read (all optional except ``round``; any value may be absent,
``None`` (metrics.json writes NaN as null), NaN or a non-finite string such as ``"inf"``: such a cell shows
:data:`DASH` with the reason, e.g. "flat f_i", and never stops the report):

* :data:`OBJECTIVE` the global objective F at the round's resulting point x_{r+1} (evaluator side; never shown to
  the server); an optional row with ``round`` 0 holds F(x0) with 0 queries;
* :data:`QUERIES_ROUND` queries spent by all clients in the round (safeguard replies included), :data:`QUERIES`
  the cumulative count; :data:`SUCCESS` 1 when F reached the task's success threshold (adversarial: F < 0);
* the attack scores of :func:`fedsim.zo.attacks.score_round` in the rounds some attack applied to
  (``zo_attacked_clients`` > 0).

Entry points: :func:`zo_markdown` (summary.md lines) and :func:`attack_summary` (the benchmarks); the report.html
sections are :mod:`fedsim.zo.report_html`, built from the same rows and texts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.zo.attacks import WIDE_FACTOR

OBJECTIVE = "zo_objective"
QUERIES = "zo_queries"
QUERIES_ROUND = "zo_queries_round"
SUCCESS = "zo_success"
ATTACKED = "zo_attacked_clients"
MASKED = "zo_is_masked"
FLAT = "zo_extraction_flat_clients"
CHANCE = "zo_label_set_chance"
DASH = "\u2014"

EXTRACTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("zo_extraction_r2_mean", "extraction R\u00b2 (fit box)"),
    ("zo_extraction_r2_wide_mean", "R\u00b2 wide box"),
    ("zo_extraction_r2_global_mean", "R\u00b2 aggregate (baseline)"),
    ("zo_extraction_r2_midpoint_mean", "R\u00b2 range midpoint (baseline)"),
    ("zo_extraction_rmse_mean", "RMSE (fit box)"),
    ("zo_extraction_rmse_global_mean", "RMSE aggregate (baseline)"),
)
LABEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("zo_label_set_accuracy_mean", "label set acc. (surrogate)"),
    ("zo_label_set_step_accuracy_mean", "label set acc. (local step)"),
    (CHANCE, "label set chance"),
)
ATTACK_COLUMNS = EXTRACTION_COLUMNS + LABEL_COLUMNS
"""(row key, column title) of the attack tables, in order."""


def value(row: Mapping[str, Any], key: str) -> float | None:
    """The row's number at ``key``: a float (possibly +-inf), or None when absent, null, NaN or not a number."""
    v = row.get(key)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def dash(reason: str | None = None) -> str:
    """The cell of a missing value, with its reason."""
    return f"{DASH} ({reason})" if reason else DASH


def fmt(v: float | None, reason: str | None = None) -> str:
    """3 decimals, or 3 significant digits for a small (RMSE ~0.005) or huge (a masked share's R^2) value;
    :func:`dash` with ``reason`` when absent."""
    if v is None:
        return dash(reason)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3f}" if v == 0 or 0.1 <= abs(v) < 1e4 else f"{v:.3g}"


def fmt_int(v: float | None, reason: str = "not recorded") -> str:
    """A count (queries, rounds), or :func:`dash` with ``reason``."""
    return dash(reason) if v is None or math.isinf(v) else f"{v:.0f}"


def fmt_objective(v: float | None, raw: Any = 0.0) -> str:
    """F with 5 significant digits; ``raw`` (the row's stored value) tells why ``v`` is missing: null or absent is
    'not recorded', NaN or +-inf 'not finite', anything else 'not a number'."""
    if v is not None:
        return f"{fmt(v)} (not finite)" if math.isinf(v) else f"{v:.5g}"
    if raw is None:
        return dash("not recorded")
    return dash("not finite") if isinstance(raw, float) or str(raw).strip().lower() == "nan" else dash("not a number")


def objective_text(row: Mapping[str, Any]) -> str:
    """:func:`fmt_objective` of a history row's F."""
    return fmt_objective(value(row, OBJECTIVE), row.get(OBJECTIVE))


@dataclass(frozen=True)
class RunInfo:
    """What the texts need from the resolved scenario (``scenario.yaml``'s dict form)."""

    method: str = "?"
    family: str = "?"
    clients: int = 0
    safeguard: str = "message"
    defenses: Mapping[str, Any] | None = None
    extraction: bool = True
    label_set: bool = True
    heldout: int | None = None

    @classmethod
    def from_scenario(cls, scn: Mapping[str, Any]) -> RunInfo:
        """From a resolved scenario dict (``Scenario.model_dump(mode="json")`` or scenario.yaml)."""
        zo = scn.get("zeroth_order") or {}
        atk = zo.get("attacks") or {}
        return cls(method=str(zo.get("method")), family=str((zo.get("task") or {}).get("family")),
                   clients=int((scn.get("federation") or {}).get("clients") or 0),
                   safeguard=str(zo.get("safeguard")), defenses=zo.get("defenses"),
                   extraction=bool(atk.get("function_extraction", True)), label_set=bool(atk.get("label_set", True)),
                   heldout=atk.get("heldout_points"))

    @property
    def secagg(self) -> bool:
        return bool((self.defenses or {}).get("secagg"))


def defense_label(defenses: Mapping[str, Any] | None) -> str:
    """A short name for a ``zeroth_order.defenses`` block: the settings that differ from no defense, or 'none'."""
    d = dict(defenses or {})
    parts = [f"{k} {d[k]:g}" for k in ("y_noise", "nu_noise", "ridge") if isinstance(d.get(k), int | float) and d[k]]
    if d.get("secagg"):
        parts.append("secagg")
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------- texts (summary.md and report.html share them)

def threat_model(info: RunInfo) -> list[str]:
    """The attacker and what each message of this run reveals to it (spec §11.6), one sentence per item."""
    public = ("the shared RFF seed (so it rebuilds the basis Omega, b), " if info.method == "fzoos" else "")
    lines = ["The attacker is the server, honest-but-curious: it runs the protocol as specified, keeps every "
             f"message it receives, and knows what the protocol makes public: {public}the clients' weights w_i and "
             "the task's parameter layout. It never sees a client's data or its private function f_i."]
    lines.append("x_{i,r} (every method): the client's local displacement from x_r, i.e. where f_i decreases "
                 "around x_r.")
    if info.method == "fzoos":
        lines.append("nu_i, y_min, y_max (fzoos): the client's whole surrogate mu_i of f_i near its recent queries, "
                     "evaluable and differentiable anywhere" + ("; under SecAgg each arrives masked and only the "
                                                                "weighted sum is readable." if info.secagg else "."))
    if info.method.startswith("scaffold"):
        lines.append("c_i (scaffold): the client's gradient estimate of f_i (its control variate).")
    if info.safeguard == "message":
        lines.append("f_i(x_{r+1}) (safeguard 'message'): the private objective value at the broadcast point, "
                     "directly.")
    return lines


def attacks_ran(history: Sequence[Mapping[str, Any]]) -> tuple[bool, bool]:
    """(extraction ran, label-set inference ran) in some attacked round of ``history``."""
    rows = attacked_rows(history)
    return any(FLAT in h for h in rows), any(CHANCE in h for h in rows)


def attack_reading(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str:
    """How to read the scores of the attacks that ran (held-out count from the run's setting)."""
    extraction, label_set = attacks_ran(history)
    n = f"{info.heldout}" if info.heldout else "the configured number of"
    parts = []
    if extraction:
        parts.append(f"Extraction: the server's rebuilt surrogate mu_i against the client's true f_i at {n} random "
                     "held-out points (zeroth_order.attacks.heldout_points) in the box the client fitted in (and "
                     f"{WIDE_FACTOR:g}x wider). R\u00b2 1 = a copy of the private function, <= 0 = no better than "
                     "the best constant; "
                     "where f_i is flat on the points R\u00b2 is undefined (shown as '\u2014 (flat f_i)'), and where "
                     "it hardly varies (a piecewise-constant metric) R\u00b2 is negative even for a close copy: read "
                     "the RMSE beside the aggregate's.")
    if label_set:
        source = "its surrogate's slope or from its local step" if info.method == "fzoos" else "its local step"
        parts.append(f"Label set: which classes a client holds, guessed from {source}; the share of the "
                     "held/not-held class decisions that are right, beside the exact "
                     "chance of a random guess of the same size; chance 1.0 (every client holds every class) makes "
                     "the score meaningless.")
    return " ".join(parts)


def no_attack_reason(info: RunInfo) -> str:
    """Why no attack table follows (a run whose rows carry no attacked client): each attack off, or not applicable
    to what this method sends on this task."""
    parts = ["x_i"] + (["nu_i", "the value range"] if info.method == "fzoos" else
                       ["a control variate"] if info.method.startswith("scaffold") else [])
    parts += ["f_i(x_{r+1})"] if info.safeguard == "message" else []
    sent = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    why = ["function extraction is off (zeroth_order.attacks.function_extraction)" if not info.extraction else
           "function extraction needs a surrogate message, which only fzoos sends" if info.method != "fzoos" else
           "no client sent a surrogate",
           "label-set inference is off (zeroth_order.attacks.label_set)" if not info.label_set else
           "label-set inference needs a task with classes (metric)" if info.family != "metric" else
           "no client sent a surrogate or a local step"]
    return f"No attack ran on these messages ({info.method} sends {sent}): {'; '.join(why)}."


def run_notes(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Caveats of this run: the SecAgg simulation, SecAgg over one client, a label-set chance of 1."""
    from fedsim.zo.client_app import secagg_note  # the simulation caveat, where the masking is done

    notes = []
    if info.secagg:
        notes.append(secagg_note(info.safeguard) + ".")
        if info.clients == 1:
            notes.append("SecAgg over 1 client hides nothing: the masked sum is that client's own message.")
    if any((value(h, CHANCE) or 0.0) >= 1.0 - 1e-12 for h in history):
        notes.append("Label-set chance is 1.0 (each attacked client holds every class): a random guess is always "
                     "right, so the label-set score says nothing and is shown as meaningless.")
    return notes


def success_line(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str | None:
    """When F first reached the task's success threshold (adversarial: F < 0), or that it never did."""
    rows = [h for h in history if SUCCESS in h]
    if not rows:
        return None
    goal = "F < 0, the adversarial image fools the models on average" if info.family == "adversarial" else \
        "F below the task's success threshold"
    hit = next((h for h in rows if value(h, SUCCESS)), None)
    if hit is None:
        return f"Success ({goal}): not reached in {len(rows)} evaluated round(s)."
    return (f"Success ({goal}): first reached in round {fmt_int(value(hit, 'round'))} "
            f"(F = {objective_text(hit)}).")


# ---------------------------------------------------------------- tables as cells (markdown and HTML)

def attacked_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of rounds some attack scored at least one client in."""
    return [h for h in history if (value(h, ATTACKED) or 0) > 0]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The columns of the attacks that ran (extraction rows carry the flat count, label-set rows the chance)."""
    cols: list[tuple[str, str]] = []
    if any(FLAT in h for h in rows):
        cols += EXTRACTION_COLUMNS
    if any(CHANCE in h for h in rows):
        cols += LABEL_COLUMNS
    return [(k, t) for k, t in cols if any(k in h for h in rows)]  # a score no round has does not apply


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [v for v in (value(h, key) for h in rows) if v is not None]
    return sum(values) / len(values) if values else None


def _reason(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """Why ``key`` has no value in ``rows``."""
    if "midpoint" in key and any(value(h, MASKED) or value(h, "zo_masked_messages") for h in rows):  # older name
        return "SecAgg share: no range"
    if "r2" in key and any((value(h, FLAT) or 0) > 0 for h in rows):
        return "flat f_i"
    if "global" in key:
        return "no aggregate"
    return "not defined"


def _cell(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """The mean of ``key`` over ``rows``, saying over how many rounds when some have no value."""
    v = _mean(rows, key)
    have = sum(value(h, key) is not None for h in rows)
    over = f" ({have} of {len(rows)} rounds)" if v is not None and 0 < have < len(rows) else ""
    if key.startswith("zo_label_set") and key != CHANCE and v is not None:
        chance = _mean(rows, CHANCE)
        if chance is not None and chance >= 1.0 - 1e-12:
            return f"{fmt(v)} (meaningless: chance 1.0){over}"
    return fmt(v, _reason(rows, key)) + over


def _attacked(row: Mapping[str, Any]) -> str:
    """Clients attacked in a round, with how many the R^2 columns average (a flat f_i has no R^2)."""
    n, flat = value(row, ATTACKED), value(row, FLAT)
    text = fmt_int(n)
    if n is not None and flat:
        text += f" (R\u00b2 over {n - flat:.0f}: {flat:.0f} flat f_i)"
    return text


def attack_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The attack scores averaged over the attacked rounds of one run (keys of :data:`ATTACK_COLUMNS`; NaN when a
    score is absent or undefined, e.g. label sets on a task without classes, R^2 of a flat f_i)."""
    rows = attacked_rows(history)
    out = {}
    for key, _ in ATTACK_COLUMNS:
        v = _mean(rows, key)
        out[key] = float("nan") if v is None else v
    return out


def attack_cells(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows of cell texts) of the per-round attack table: round, clients attacked, the columns of
    the attacks that ran, then a mean row. Empty when no round was attacked."""
    rows = attacked_rows(history)
    if not rows:
        return [], []
    cols = _columns(rows)
    head = ["round", "clients attacked"] + [t for _, t in cols]
    body = [[fmt_int(value(h, "round")), _attacked(h)] + [_cell([h], k) for k, _ in cols] for h in rows]
    if len(rows) > 1:
        body.append([f"mean of {len(rows)} rounds", ""] + [_cell(rows, k) for k, _ in cols])
    return head, body


def objective_cells(history: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per-round rows (round, F, queries this round, queries total) of the rows that hold the objective."""
    return [[fmt_int(value(h, "round")), objective_text(h), fmt_int(value(h, QUERIES_ROUND)),
             fmt_int(value(h, QUERIES))] for h in history if OBJECTIVE in h]


def objective_line(info: RunInfo, history: Sequence[Mapping[str, Any]]) -> str | None:
    """F first -> last with the queries spent; None when no row has the objective."""
    rows = [h for h in history if OBJECTIVE in h]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    total = value(last, QUERIES)
    return (f"Method `{info.method}`: global objective F {objective_text(first)} (round "
            f"{fmt_int(value(first, 'round'))}) -> {objective_text(last)} (round "
            f"{fmt_int(value(last, 'round'))})" + (f" after {total:.0f} queries." if total is not None
                                                   and not math.isinf(total) else " (queries not recorded)."))


def _md_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]


def attack_table_markdown(settings: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Markdown table, one line per defense setting (label -> that run's history rows): the attack scores averaged
    over its attacked rounds. Empty when no setting was attacked."""
    present = {label: attacked_rows(rows) for label, rows in settings.items() if attacked_rows(rows)}
    if not present:
        return []
    cols = _columns([h for rows in present.values() for h in rows])
    return _md_table(["defense"] + [t for _, t in cols],
                     [[label] + [_cell(rows, k) for k, _ in cols] for label, rows in present.items()])


def zo_markdown(history: Sequence[Mapping[str, Any]], info: RunInfo) -> list[str]:
    """summary.md lines of a zeroth-order run: threat model, F first -> last with the queries spent, success, the
    per-round table, the attacks per round with their reading (or why none ran), and the run's caveats."""
    line = objective_line(info, history)
    if line is None:
        return []
    lines = ["## Threat model", "", *(f"- {t}" for t in threat_model(info)), "",
             "## Zeroth-order optimisation", "", line, ""]
    success = success_line(info, history)
    if success:
        lines += [success, ""]
    lines += [*_md_table(["round", "F(x)", "queries this round", "queries total"], objective_cells(history)), "",
              "## What the server learned from the messages", ""]
    head, body = attack_cells(history)
    if head:
        lines += [attack_reading(info, history), "", f"Defense: {defense_label(info.defenses)}.", "",
                  *_md_table(head, body), ""]
    else:
        lines += [no_attack_reason(info), ""]
    notes = run_notes(info, history)
    if notes:
        lines += ["## Caveats", "", *(f"- {n}" for n in notes), ""]
    return lines
