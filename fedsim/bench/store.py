"""The bench cell store: ``BENCH_DIR/cells.jsonl``, one JSON record per FINISHED cell (ok or failed).

Each record is appended with a single ``write()`` of the whole line and its newline, then fsync'd,
so a crash leaves at worst a truncated LAST line, which :func:`read_records` ignores and
:func:`repair` cuts off before the next append. Record keys are fixed by the shared bench format
(see ``fedsim/bench/__init__.py``); :func:`summarize_run` builds the record's ``summary``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedsim import jsonio
from fedsim.headline import LEAKAGE_KEYS  # image, model-inversion and text keys (one registry)
from fedsim.outcomes import time_limited_count, was_not_attacked
from fedsim.privacy.summary import epsilon_fields, run_privacy
from fedsim.report.divergence import divergence_note

CELLS_FILE = "cells.jsonl"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line: a single write of line + newline, then flush and fsync."""
    data = (jsonio.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # regular files take it in one go; be correct if not
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a truncated or unparsable line (a crash mid-append) is ignored."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = jsonio.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "cell_id" in record:
            records.append(record)
    return records


def finished_ids(path: Path) -> set[str]:
    """Ids of the cells with a record (ok or failed)."""
    return {r["cell_id"] for r in read_records(path)}


def repair(path: Path) -> bool:
    """Cut a truncated last line (no newline) so the next append starts a fresh line; True if cut."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "r+b") as fh:
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def drop_records(path: Path, cell_ids: Iterable[str]) -> int:
    """Rewrite the store without the given cells (atomically: temp file + rename); returns how many went."""
    drop = set(cell_ids)
    records = read_records(path)
    keep = [r for r in records if r["cell_id"] not in drop]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(jsonio.dumps(r) + "\n" for r in keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(records) - len(keep)


def _mean(values: list[float]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarize_run(result_or_metrics: Any) -> dict[str, Any]:
    """A cell's ``summary``: leakage means over its non-failed attack outcomes, failures, final utility
    (``test_accuracy``, and ``test_loss`` when evaluated: the last evaluated round's), ``federation_s`` (the
    federation's wall time in seconds, attacks excluded, when the run recorded it) and ε.

    Accepts a :class:`fedsim.run.RunResult` or a run directory's parsed ``metrics.json``. The ε fields
    come from :func:`fedsim.privacy.summary.epsilon_fields` (the report uses the same function):
    ``epsilon`` is central DP's, else the max over clients of each DP-SGD client's epsilon over the
    whole run, with ``epsilon_min`` / ``epsilon_median`` and dp_accounting's RDP / PLD figures; None
    without DP.
    """
    if isinstance(result_or_metrics, dict):
        timing = result_or_metrics.get("timing") or {}
        history = result_or_metrics.get("utility", [])
        attacks = [(a.get("failed"), a.get("metrics", {})) for a in result_or_metrics.get("attacks", [])]
        clients = result_or_metrics.get("client_metrics", {}) or {}
        stored = result_or_metrics.get("privacy")
    else:
        timing = result_or_metrics.timing or {}
        history = result_or_metrics.history
        attacks = [(o.failed, o.metrics) for o in result_or_metrics.outcomes]
        clients = result_or_metrics.client_metrics or {}
        stored = getattr(result_or_metrics, "privacy", None) or None
    summary: dict[str, Any] = {}
    ok = [m for failed, m in attacks if not failed]
    for key in LEAKAGE_KEYS:
        value = _mean([m[key] for m in ok if key in m and m[key] is not None])
        if value is not None:
            summary[key] = value
    summary["attacks_failed"] = sum(1 for failed, _ in attacks if failed and not was_not_attacked(failed))
    skipped = sum(1 for failed, _ in attacks if was_not_attacked(failed))
    if skipped:  # targets without an update (not sampled): shown as not attacked, not as attack failures
        summary["attacks_not_attacked"] = skipped
    outcomes = (result_or_metrics.get("attacks", []) if isinstance(result_or_metrics, dict)
                else [o.to_json() for o in result_or_metrics.outcomes])
    if any(o.get("oracle") for o in outcomes):
        summary["oracle"] = True  # the runner marked an outcome oracle (ground truth handed or used to select)
    limited = time_limited_count(outcomes)
    if limited:  # scored outcomes that budget.time_limit_s stopped: their numbers depend on wall time
        summary["attacks_time_limited"] = limited
    evaluated = [h for h in history if h.get("test_accuracy") is not None]
    summary["test_accuracy"] = float(evaluated[-1]["test_accuracy"]) if evaluated else None
    losses = [h for h in history if isinstance(h.get("test_loss"), int | float)]
    if losses:  # a regression task's utility (no accuracy); absent keys: not measured
        summary["test_loss"] = float(losses[-1]["test_loss"])
        if isinstance(losses[-1].get("test_perplexity"), int | float):  # language modeling
            summary["test_perplexity"] = float(losses[-1]["test_perplexity"])
    if isinstance(timing.get("federation_s"), int | float):
        summary["federation_s"] = float(timing["federation_s"])  # training wall time, without the attacks
    summary.update(epsilon_fields(run_privacy(stored, history, clients)))
    summary["rounds"] = max((int(h["round"]) for h in history), default=0)
    diverged = divergence_note(history)
    if diverged is not None:  # why the cell's utility is not learning (absent: the loss stayed finite and bounded)
        summary["training_diverged"] = diverged
    # client failures over the run (fedsim.simulation.participation): the cell's numbers came from fewer clients
    summary["clients_failed"] = int(sum(h.get("clients_failed", 0) for h in history))
    return summary  # inf (epsilon with sigma = 0) stays inf: jsonio writes it as "inf", never as null
