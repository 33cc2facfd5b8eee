"""Read a run directory (``metrics.json``) or a benchmark directory (``cells.jsonl``) into plain rows.

Both become a :class:`Source` holding :class:`Cell` rows in the shared benchmark-cell shape (attack,
defense, params, repeat, status, summary), so the leaderboard, frontier and HTML report treat a single
``fedsim run`` and a ``fedsim bench`` grid alike. A single run gives one cell per attack it ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import yaml

from fedsim import jsonio
from fedsim.errors import FedsimError
from fedsim.headline import LEAKAGE_KEYS  # image, model-inversion and text keys (one registry)
from fedsim.outcomes import time_limited_count, was_not_attacked
from fedsim.outputs import confined
from fedsim.privacy.summary import epsilon_fields, run_privacy
from fedsim.report.metrics_check import check_metrics


class ReportSourceError(FedsimError):
    """The directory given to ``fedsim report`` is not a run or benchmark directory, or is unreadable."""


@dataclass
class Cell:
    """One finished benchmark cell (or one attack of a single run), as in the shared cells.jsonl format."""

    cell_id: str
    attack: str
    defense: str
    params: dict[str, Any]
    repeat: int
    seed: int | None
    status: str
    error: str | None
    seconds: float | None
    run_dir: Path | None
    summary: dict[str, Any]
    attack_index: int | None = None  # which of the run's attacks (None: every attack of the cell)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Source:
    """What a report is built from: a single run or a benchmark grid."""

    kind: Literal["run", "bench"]
    path: Path
    cells: list[Cell]
    skipped_lines: list[int] = field(default_factory=list)  # unreadable cells.jsonl lines (1-based)
    truncated_tail: bool = False  # the last cells.jsonl line was cut off (a bench still running or killed)
    grid: dict[str, Any] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = jsonio.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ReportSourceError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise ReportSourceError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_yaml(path: Path) -> dict[str, Any] | None:
    """A YAML mapping (safe_load), or None when the file is absent or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """A run directory's metrics.json, its fields' shapes checked (:func:`check_metrics`).

    Raises :class:`ReportSourceError` (one line naming the file and the field) when it is not JSON or a field
    the report reads has the wrong type."""
    path = Path(run_dir) / "metrics.json"
    metrics = _read_json(path)
    try:
        check_metrics(metrics, path)
    except ValueError as err:
        raise ReportSourceError(str(err)) from None
    return metrics


def epsilon_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ε fields of a run's metrics.json (:func:`fedsim.privacy.summary.epsilon_fields`, which the bench's
    cell summary uses too): each client's ε over the whole run, not the last round's participants only."""
    return epsilon_fields(run_privacy(metrics.get("privacy"), metrics.get("utility") or [],
                                      metrics.get("client_metrics") or {}))


def final_epsilon(metrics: dict[str, Any]) -> float | None:
    """The run's headline ε (see :func:`epsilon_summary`): central DP's, else the max over DP-SGD clients."""
    return epsilon_summary(metrics)["epsilon"]


def summarize_metrics(metrics: dict[str, Any], attack_index: int | None = None) -> dict[str, Any]:
    """The cell summary of the shared bench format, from a run's metrics.json: leakage means over the
    non-failed outcomes (of one attack when ``attack_index`` is given), final test accuracy (and test loss) and
    epsilon."""
    outcomes = [o for o in metrics.get("attacks") or []
                if attack_index is None or o.get("attack_index") == attack_index]
    good = [o for o in outcomes if not o.get("failed")]
    summary: dict[str, Any] = {}
    for key in LEAKAGE_KEYS:
        values = [o["metrics"][key] for o in good if isinstance((o.get("metrics") or {}).get(key), int | float)]
        if values:
            summary[key] = mean(values)
    evaluated = [h for h in metrics.get("utility") or [] if isinstance(h.get("test_accuracy"), int | float)]
    skipped = sum(1 for o in outcomes if was_not_attacked(o.get("failed")))
    summary["attacks_failed"] = len(outcomes) - len(good) - skipped
    if skipped:  # targets without an update (not sampled): not attacked, never an attack failure
        summary["attacks_not_attacked"] = skipped
        summary["not_attacked_reasons"] = sorted({str(o["failed"]) for o in outcomes
                                                  if was_not_attacked(o.get("failed"))})
    if any(o.get("oracle") for o in outcomes):
        summary["oracle"] = True  # the runner marked an outcome oracle (ground truth handed or used to select)
    limited = time_limited_count(outcomes)
    if limited:  # scored outcomes that budget.time_limit_s stopped: their numbers depend on wall time
        summary["attacks_time_limited"] = limited
    summary["test_accuracy"] = float(evaluated[-1]["test_accuracy"]) if evaluated else None
    losses = [h for h in metrics.get("utility") or [] if isinstance(h.get("test_loss"), int | float)]
    if losses:  # a regression task's utility (no accuracy), as fedsim.bench.store.summarize_run records it
        summary["test_loss"] = float(losses[-1]["test_loss"])
        if isinstance(losses[-1].get("test_perplexity"), int | float):  # language modeling
            summary["test_perplexity"] = float(losses[-1]["test_perplexity"])
    summary.update(epsilon_summary(metrics))
    summary["rounds"] = max((int(h.get("round", 0)) for h in metrics.get("utility") or []), default=0)
    return summary


def defense_label(scenario: dict[str, Any] | None) -> str:
    """``none`` or the scenario's defense names joined with ``+`` (in scenario order)."""
    defenses = (scenario or {}).get("defenses") or []
    return "+".join(str(d.get("name")) for d in defenses if isinstance(d, dict)) or "none"


def _sok(outcomes: Any) -> str:
    """The SoK tag of one attack's outcomes (``fedsim.threat_models.sok_tag``): the letter they exercised (absent in
    metrics.json files before issue 14), the strongest when they differ (an outcome on a model another attack
    manipulated is filed under that attack's letter too, and says by whom)."""
    from fedsim.threat_models import sok_tag

    mine = list(outcomes)
    letters = [str(o["threat_model"]) for o in mine if o.get("threat_model")]
    by = sorted({str((o.get("manipulated_by") or {}).get("attack")) for o in mine if o.get("manipulated_by")})
    # a manipulated outcome's letter holds every capability of the same attack's honest one: it comes first
    letter = next((str(o["threat_model"]) for o in mine if o.get("manipulated_by") and o.get("threat_model")),
                  letters[0] if letters else "")
    return sok_tag(letter, ", ".join(by) or None)


def load_run(path: Path) -> Source:
    """A single run directory: one cell per attack of the scenario (or one utility-only cell)."""
    metrics = load_metrics(path)
    scenario = read_yaml(path / "scenario.yaml")
    defense = defense_label(scenario)
    attacks: dict[int, str] = {}
    outcomes = metrics.get("attacks") or []
    for o in outcomes:  # an attack is labelled oracle when the runner marked any of its outcomes so
        index = int(o.get("attack_index", 0))
        oracle = any(p.get("oracle") for p in outcomes if int(p.get("attack_index", 0)) == index)
        attacks.setdefault(index, str(o.get("attack")) + (" (oracle)" if oracle else "")
                           + _sok(p for p in outcomes if int(p.get("attack_index", 0)) == index))
    seed = metrics.get("seed")
    seconds = (metrics.get("timing") or {}).get("total_s")
    cells = []
    for index, name in sorted(attacks.items()) or [(None, "(no attack)")]:
        try:  # check_metrics covers the fields read here; this names the file should a deeper field be wrong
            summary = summarize_metrics(metrics, index)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ReportSourceError(f"{path / 'metrics.json'}: a field has an unexpected shape "
                                    f"({type(err).__name__}: {err})") from None
        mine = [o for o in metrics.get("attacks") or [] if o.get("attack_index") == index]
        # a cell fails when every outcome that had an update to attack failed; a target without one ("not
        # attacked": the client was not sampled) is no failure (fedsim.outcomes), so it never fails the cell
        attacked = [o for o in mine if not was_not_attacked(o.get("failed"))]
        failed = bool(attacked) and all(o.get("failed") for o in attacked)
        error = "; ".join(sorted({str(o["failed"]) for o in mine if o.get("failed")})) if failed else None
        cells.append(Cell(f"attack{index}" if index is not None else "run", name, defense, {}, 0, seed,
                          "failed" if failed else "ok", error, seconds, path, summary, index))
    return Source("run", path, cells)


class UnsafeRecordError(ReportSourceError):
    """A cells.jsonl record names a path outside its bench directory (a poisoned or hand-edited store)."""


def _parse_cell(record: dict[str, Any], root: Path) -> Cell:
    run_dir = record.get("run_dir")
    run_path = None
    if isinstance(run_dir, str) and run_dir:
        run_path = confined(root, run_dir)
        if run_path is None:  # never read (or copy images from) anything outside the bench directory
            raise UnsafeRecordError(f"{root / 'cells.jsonl'} line {record.get('_line', '?')}: run_dir {run_dir!r} "
                                    f"points outside {root}; refusing to read it")
    summary = record.get("summary") if isinstance(record.get("summary"), dict) else {}
    if not summary and run_path is not None and (run_path / "metrics.json").is_file():
        summary = summarize_metrics(load_metrics(run_path))
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    _check_record(record, summary)
    return Cell(
        cell_id=str(record.get("cell_id", "?")), attack=str(record.get("attack", "?")),
        defense=str(record.get("defense", "none")), params=params, repeat=int(record.get("repeat") or 0),
        seed=record.get("seed"), status="ok" if record.get("status") == "ok" else "failed",
        error=record.get("error"), seconds=record.get("seconds"), run_dir=run_path, summary=summary,
    )


def _check_record(record: dict[str, Any], summary: dict[str, Any]) -> None:
    """Raise ValueError (the record's line is then reported as unreadable) when a field the report reads has
    the wrong JSON type: seed, seconds, error, or a numeric summary field."""
    numeric = {"seed": record.get("seed"), "seconds": record.get("seconds"),
               **{f"summary.{k}": summary.get(k) for k in (*LEAKAGE_KEYS, "test_accuracy", "test_loss", "epsilon")}}
    for field_name, value in numeric.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{field_name} must be a number, found {type(value).__name__}")
    if record.get("error") is not None and not isinstance(record.get("error"), str):
        raise ValueError("error must be a string")


def read_cells(path: Path) -> tuple[list[dict[str, Any]], list[int], bool]:
    """Records of a cells.jsonl, the 1-based numbers of unreadable lines, and whether the last line was cut.

    A last line without its newline, or that is not valid JSON, is a cell still being written (or a
    killed bench): it is ignored. Any other unreadable line is reported, never silently dropped.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ReportSourceError(f"{path}: cannot read it ({err})") from err
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail is "" when the file ends with a newline
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = jsonio.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            record.setdefault("_line", number)  # for reporting a record that parses but cannot be used
            records.append(record)
        elif number == len(complete) and not tail:
            return records, bad, True  # a last line that is not JSON: cut off mid-write
        else:
            bad.append(number)
    truncated = bool(tail.strip())
    return records, bad, truncated


def load_bench(path: Path) -> Source:
    """A benchmark directory: its cells.jsonl (tolerant of a truncated last line) and grid.yaml."""
    records, bad, truncated = read_cells(path / "cells.jsonl")
    cells = []
    for record in records:
        try:
            cells.append(_parse_cell(record, path))
        except UnsafeRecordError:
            raise
        except (ReportSourceError, ValueError, TypeError):  # e.g. a non-integer repeat, a corrupt metrics.json
            bad.append(int(record.get("_line", 0)))
    if not cells:
        raise ReportSourceError(f"{path / 'cells.jsonl'}: no finished cell yet, nothing to report")
    return Source("bench", path, cells, bad, truncated, read_yaml(path / "grid.yaml"))


def load_source(path: Path) -> Source:
    """A run directory (has metrics.json) or a benchmark directory (has cells.jsonl)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportSourceError(f"{path}: not a directory" if path.exists() else f"{path}: no such directory")
    if (path / "cells.jsonl").is_file():
        return load_bench(path)
    if (path / "metrics.json").is_file():
        return load_run(path)
    raise ReportSourceError(f"{path}: neither a run directory (metrics.json) nor a benchmark directory (cells.jsonl)")
