"""The DP frontier: utility against epsilon, one row per DP method and target epsilon, over seeds.

A bench that runs several DP methods (dp_sgd, dp_sat, dp_sam, diff2, central_dp, ...) at several privacy
budgets (usually a sweep of ``target_epsilon``) answers one question: at the same epsilon, which method
trains the better model, at what cost in time, and what can the curious server still reconstruct? This
module turns its cells into :class:`FrontierRow` s:

* **method**: the grid's defense entry label, without the swept parameters that :mod:`fedsim.bench.expand`
  appends (``dp_sgd(target_epsilon=3)`` -> ``dp_sgd``); **target**: the ``target_epsilon`` the cell asked
  for (a swept ``...target_epsilon`` parameter, else the one in the cell's scenario.yaml), None when the
  method was given a noise multiplier.
* **epsilon** (Opacus's accountant), **epsilon_rdp** / **epsilon_pld** (Google's dp_accounting): the cells'
  headline figures (:func:`fedsim.privacy.summary.epsilon_fields`), the MAX over seeds (the guarantee
  that holds for every seed); **level**: what one unit of privacy is (``sample``: one example of a
  client, DP-SGD-style; ``client``: a client's whole data, central DP): epsilons of different levels are
  not the same promise and are never ranked against each other. **epsilon_vs_server**: what is left against
  the curious server itself: the cells' ``epsilon_vs_server`` when they report one (DIFF2: inf under central
  noise, which the server adds after seeing every message), else the headline for sample-level DP (DP-SGD's
  clients noise before sending) and inf for client-level DP (central DP's server sees raw updates).
* **utility**: final ``test_accuracy`` (or ``test_loss`` for a task without accuracy, lower is better),
  mean and sample std (n - 1) over repeats; **seconds**: the federation's wall time (``federation_s``,
  attacks excluded); **attack** / **psnr**: the attack with the highest mean PSNR over repeats (the
  defender must assume the strongest), its mean and std; for text attacks (no PSNR) the same on the first of
  :data:`TEXT_LEAKAGE` the cells report (``leak_key`` names which: exact sequences, ROUGE-L, bag recall).
* **diverged**: the repeats whose training diverged (the summary's ``training_diverged``, or a utility that is
  not finite), each named in ``note``; such a row is never on the Pareto front.
* **matched**: whether the achieved epsilon is the target: not above it by more than the solver's tolerance
  (:data:`SOLVER_TOLERANCE`, 0.01 relative) nor below by more than :data:`MATCH_TOLERANCE`; a row that
  is not says so in ``note`` instead of being dropped, as does a row whose cells all failed.

Cells of one repeat share their seed and differ only in the attack, so their federation is the same:
utility, time and epsilon are taken once per repeat (the mean over its ok cells).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from fedsim import jsonio
from fedsim.privacy.summary import epsilon_vs_server
from fedsim.report.frontier import pareto_front
from fedsim.report.loading import Cell, read_yaml
from fedsim.report.tables import Stat

SOLVER_TOLERANCE = 0.01  # the noise solve's tolerance (Opacus epsilon_tolerance 0.01), read relative to the target
MATCH_TOLERANCE = 0.02  # below the target by more than 2 %: a more private point than asked, not the target
REFERENCE_METHOD = "dp_sgd"  # wall-time ratios are against this method at the same target

#: Text attacks' leakage in the frontier (no PSNR), the first each row's cells report: key -> short name.
TEXT_LEAKAGE = {"exact_seq_rate": "exact seq.", "rougeL_mean": "ROUGE-L", "token_set_recall": "bag recall"}


@dataclass
class FrontierRow:
    """One (method, target epsilon) group of cells."""

    method: str
    target: float | None
    cells: list[Cell]
    level: str | None = None
    epsilon: float | None = None
    epsilon_rdp: float | None = None
    epsilon_pld: float | None = None
    epsilon_vs_server: float | None = None
    utility_key: str = "test_accuracy"
    utility: Stat | None = None
    seconds: Stat | None = None
    attack: str | None = None
    psnr: Stat | None = None  # the best attack's leakage: mean PSNR, or the text metric ``leak_key`` names
    leak_key: str = "psnr_mean"
    repeats: int = 0
    failed: int = 0
    note: str = ""
    pareto: bool = False
    time_ratio: float | None = None  # seconds / the reference method's seconds at the same target
    diverged: dict[int, str] | None = None  # repeat -> why its training diverged (never on the front)

    @property
    def dp(self) -> bool:
        """A DP row: it reports an epsilon, or it asked for one."""
        return self.epsilon is not None or self.target is not None

    @property
    def x(self) -> float | None:
        """Where the row sits on the epsilon axis: the achieved epsilon, else the target. An infinite epsilon
        (sigma = 0) has no place on the log axis: the table shows it as inf, the plot leaves the row out."""
        if self.epsilon is not None:
            return self.epsilon if math.isfinite(self.epsilon) else None
        return self.target

    @property
    def matched(self) -> bool | None:
        """The rule: MISSED when the achieved epsilon is above the target by more than the solver's tolerance,
        :data:`SOLVER_TOLERANCE` (0.01) relative (the promise is weaker than asked), or below it by more than
        :data:`MATCH_TOLERANCE` relative (a different point); None without a target or an epsilon."""
        if self.target is None or self.epsilon is None:
            return None
        return (self.target * (1 - MATCH_TOLERANCE) <= self.epsilon
                <= self.target * (1 + SOLVER_TOLERANCE))


def stat(values: Iterable[float | None]) -> Stat | None:
    """Mean and sample standard deviation (n - 1; None for one value) of the finite values; None if none."""
    finite = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if not finite:
        return None
    return Stat(mean(finite), stdev(finite) if len(finite) >= 2 else None, len(finite))


def _defense_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k.rsplit(".", 1)[-1]: v for k, v in params.items() if k.startswith("defenses.")}


def method_of(cell: Cell) -> str:
    """The defense entry's label: the cell's defense label without the ``(k=v, ...)`` of its swept defense
    parameters (the exact suffix :func:`fedsim.bench.expand.expand_grid` appends)."""
    shown = _defense_params(cell.params)
    suffix = "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
    return cell.defense[: -len(suffix)] if shown and cell.defense.endswith(suffix) else cell.defense


def target_of(cell: Cell) -> float | None:
    """The target epsilon the cell asked for: a swept ``...target_epsilon``, else its scenario's defenses'."""
    for key, value in cell.params.items():
        if key.startswith("defenses.") and key.endswith(".target_epsilon") and isinstance(value, int | float):
            return float(value)
    scenario = read_yaml(cell.run_dir / "scenario.yaml") if cell.run_dir is not None else None
    for spec in (scenario or {}).get("defenses") or []:
        value = (spec.get("params") or {}).get("target_epsilon") if isinstance(spec, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _max(values: Iterable[Any]) -> float | None:
    numbers = [v for v in map(_number, values) if v is not None and not math.isnan(v)]
    return max(numbers) if numbers else None


def _per_repeat(cells: Sequence[Cell], key: str | Callable[[Cell], float | None]) -> list[float]:
    """One value per repeat: the mean over that repeat's ok cells that report it (``key``: a summary key,
    or a function of the cell)."""
    by_repeat: dict[int, list[float]] = defaultdict(list)
    for c in cells:
        value = key(c) if callable(key) else _number(c.summary.get(key))
        if c.ok and value is not None and math.isfinite(value):
            by_repeat[c.repeat].append(value)
    return [mean(v) for _, v in sorted(by_repeat.items())]


def _seconds(cell: Cell) -> float | None:
    """The federation's wall time: the summary's ``federation_s``, else the run's metrics.json timing."""
    value = _number(cell.summary.get("federation_s"))
    if value is None and cell.run_dir is not None and (cell.run_dir / "metrics.json").is_file():
        try:
            timing = jsonio.loads((cell.run_dir / "metrics.json").read_text(encoding="utf-8")).get("timing") or {}
        except (OSError, ValueError):
            return None
        value = _number(timing.get("federation_s"))
    return value


def _diverged(ok: Sequence[Cell], utility_key: str) -> dict[int, str]:
    """Repeat -> why it diverged: the cell summary's ``training_diverged`` line
    (:func:`fedsim.report.divergence.divergence_note`), or a utility that is present but not finite (which the
    per-repeat mean leaves out, so it must be named here instead of silently shrinking the seeds)."""
    out: dict[int, str] = {}
    for c in ok:
        note = c.summary.get("training_diverged")
        if isinstance(note, str) and note:
            out.setdefault(c.repeat, note)
        elif utility_key in c.summary and (_number(c.summary[utility_key]) is None
                                           or not math.isfinite(_number(c.summary[utility_key]))):
            out.setdefault(c.repeat, f"{utility_key} is {c.summary[utility_key]}")
    return out


def _build(method: str, target: float | None, cells: list[Cell], utility_key: str) -> FrontierRow:
    row = FrontierRow(method, target, cells, utility_key=utility_key)
    ok = [c for c in cells if c.ok]
    row.failed = len(cells) - len(ok)
    row.repeats = len({c.repeat for c in ok})
    levels = sorted({str(c.summary["epsilon_level"]) for c in ok if c.summary.get("epsilon_level")})
    row.level = "+".join(levels) or None
    row.epsilon = _max(c.summary.get("epsilon") for c in ok)
    row.epsilon_rdp = _max(c.summary.get("epsilon_dp_accounting_rdp") for c in ok)
    row.epsilon_pld = _max(c.summary.get("epsilon_dp_accounting_pld") for c in ok)
    row.epsilon_vs_server = _max(epsilon_vs_server(c.summary) for c in ok)
    row.utility = stat(_per_repeat(ok, utility_key))
    row.diverged = _diverged(ok, utility_key)
    row.seconds = stat(_per_repeat(ok, _seconds))
    by_attack: dict[str, list[Cell]] = defaultdict(list)
    for c in ok:
        by_attack[c.attack].append(c)
    for key in ("psnr_mean", *TEXT_LEAKAGE):  # image attacks by PSNR, text attacks by their headline
        psnr = {a: stat(_per_repeat(cs, key)) for a, cs in by_attack.items()}
        psnr = {a: s for a, s in psnr.items() if s is not None}
        if psnr:
            row.leak_key = key
            break
    if psnr:
        row.attack = max(sorted(psnr), key=lambda a: psnr[a].mean)
        row.psnr = psnr[row.attack]
    notes = []
    if not ok:
        errors = sorted({c.error or "failed" for c in cells})
        notes.append("every cell failed: " + "; ".join(errors))
    elif row.matched is False:
        above = row.epsilon > row.target
        notes.append(f"not matched: achieved \u03b5 {row.epsilon:.4g} is "
                     + (f"above target {row.target:g} by more than the solver's tolerance "
                        f"({SOLVER_TOLERANCE:g} relative)" if above else
                        f"below target {row.target:g} by more than {MATCH_TOLERANCE:.0%}"))
    elif target is not None and row.epsilon is None:
        notes.append("no \u03b5 reported")
    if row.failed and ok:
        notes.append(f"{row.failed} failed cell(s) left out")
    if row.diverged:
        seeds = ", ".join(str(k) for k in sorted(row.diverged))
        notes.append(f"DIVERGED in {len(row.diverged)} of {row.repeats} seed(s) (repeat {seeds}; never on the front;"
                     " a non-finite utility is left out of the mean): "
                     + "; ".join(sorted(set(row.diverged.values()))))
    row.note = "; ".join(notes)
    return row


def frontier_rows(cells: Sequence[Cell]) -> list[FrontierRow]:
    """One row per (method, target epsilon), sorted by method then target; Pareto and time ratios set.

    Utility is test accuracy when any cell reports one, else test loss. Pareto: within each epsilon
    level, the DP rows without a diverged repeat that no other such row beats on both epsilon (lower) and
    utility (higher accuracy, lower loss), by :func:`fedsim.report.frontier.pareto_front`.
    """
    key = "test_accuracy" if any(_number(c.summary.get("test_accuracy")) is not None for c in cells) else "test_loss"
    groups: dict[tuple[str, float | None], list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(method_of(c), target_of(c))].append(c)
    rows = [_build(m, t, cs, key) for (m, t), cs in groups.items()]
    rows.sort(key=lambda r: (r.method, r.target if r.target is not None else math.inf, r.x or math.inf))
    sign = 1.0 if key == "test_accuracy" else -1.0
    for level in {r.level for r in rows if r.dp}:
        ranked = [r for r in rows if r.dp and r.level == level and r.utility is not None and r.x is not None
                  and not r.diverged]  # a diverged seed's utility is no point of a trade-off
        for i in pareto_front([(sign * r.utility.mean, r.x) for r in ranked]):
            ranked[i].pareto = True
    reference = {r.target: r for r in rows if r.method == REFERENCE_METHOD and r.seconds is not None}
    for r in rows:
        ref = reference.get(r.target)
        if ref is not None and r.seconds is not None and ref.seconds.mean > 0:
            r.time_ratio = r.seconds.mean / ref.seconds.mean
    return rows


def has_frontier(rows: Sequence[FrontierRow]) -> bool:
    """Whether there is a frontier to show: some DP method at two or more distinct epsilons."""
    xs: dict[str, set[float]] = defaultdict(set)
    for r in rows:
        if r.dp and r.x is not None and r.utility is not None:
            xs[r.method].add(round(r.x, 9))
    return any(len(v) >= 2 for v in xs.values())


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _pm(s: Stat | None, digits: int) -> str:
    if s is None:
        return "-"
    return _fmt(s.mean, digits) + (f" \u00b1 {_fmt(s.std, digits)}" if s.std is not None else "")


COLUMNS = ("method", "\u03b5 target", "\u03b5 Opacus", "\u03b5 dp-acc RDP", "\u03b5 dp-acc PLD", "level",
           "\u03b5 vs server", "utility", "time (s)", "time \u00d7 dp_sgd", "best attack", "PSNR (dB)", "seeds",
           "front", "note")


def row_cells(r: FrontierRow) -> list[str]:
    """The row as the table's text cells, in :data:`COLUMNS` order."""
    digits = 3
    return [r.method, _fmt(r.target, 3).rstrip("0").rstrip(".") if r.target is not None else "-",
            _fmt(r.epsilon, 3), _fmt(r.epsilon_rdp, 3), _fmt(r.epsilon_pld, 3), r.level or "-",
            _fmt(r.epsilon_vs_server, 3),
            _pm(r.utility, digits), _pm(r.seconds, 1), _fmt(r.time_ratio, 2) if r.time_ratio is not None else "-",
            r.attack or "-", _pm(r.psnr, 2) + ("" if r.leak_key == "psnr_mean" or r.psnr is None else
                                               f" ({TEXT_LEAKAGE[r.leak_key]})"),
            str(r.repeats), "*" if r.pareto else "", r.note]


def utility_title(rows: Sequence[FrontierRow]) -> str:
    key = rows[0].utility_key if rows else "test_accuracy"
    return "test accuracy (higher is better)" if key == "test_accuracy" else "test loss (lower is better)"


def text_table(rows: Sequence[FrontierRow]) -> str:
    """The frontier as one plain-text table (what ``benchmarks/dp_frontier.py`` prints)."""
    lines = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + (f"\nutility: {utility_title(rows)}, mean \u00b1 std over seeds; \u03b5: max over seeds; "
                             f"time: the federation's wall time (attacks excluded), which includes each client's "
                             "one-off noise calibration when the method solves it from a target \u03b5 "
                             "(every cell solves its own); not matched: the achieved \u03b5 is above the target by "
                             f"more than the solver's tolerance ({SOLVER_TOLERANCE:g} relative) or below it by more "
                             f"than {MATCH_TOLERANCE:.0%}\n")


def write_frontier_csv(rows: Sequence[FrontierRow], path: Path) -> Path:
    """``dp_frontier.csv``: the table with means and stds in separate columns."""
    head = ["method", "target_epsilon", "epsilon", "epsilon_dp_accounting_rdp", "epsilon_dp_accounting_pld",
            "epsilon_level", "epsilon_vs_server", "utility_key", "utility_mean", "utility_std", "federation_s_mean",
            "federation_s_std", "time_ratio", "best_attack", "psnr_mean", "psnr_std", "repeats", "failed", "pareto",
            "note", "leakage_key"]  # the metric in psnr_mean/psnr_std (a text attack's when not psnr_mean)

    def num(value: float | None) -> str:
        return "" if value is None else repr(value)

    def pm(value: Stat | None) -> list[str]:
        return ["", ""] if value is None else [num(value.mean), num(value.std)]

    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for r in rows:
            writer.writerow([r.method, num(r.target), num(r.epsilon), num(r.epsilon_rdp), num(r.epsilon_pld),
                             r.level or "", num(r.epsilon_vs_server), r.utility_key, *pm(r.utility), *pm(r.seconds),
                             num(r.time_ratio), r.attack or "", *pm(r.psnr), r.repeats, r.failed, int(r.pareto),
                             r.note, r.leak_key if r.psnr is not None else ""])
    return Path(path)
