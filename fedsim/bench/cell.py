"""One cell, run where it is scheduled (this process or a Ray worker): its run directory and its record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedsim.bench.expand import Cell
from fedsim.bench.store import summarize_run


def run_cell(cell: Cell, out_dir: str, num_cpus: float = 1.0) -> dict[str, Any]:
    """Run one cell into ``out_dir/cells/<id>`` and return its record (never raises for a cell's error).

    The cell runs with ``num_cpus`` torch threads; the caller's count is restored afterwards (a serial
    bench runs its cells in the driver's process). Per-run caches (:mod:`fedsim.run_caches`) are emptied
    first, so the cell's wall time does not depend on the cells run before it in this process."""
    from fedsim.isolation import torch_threads
    from fedsim.run import run_scenario
    from fedsim.run_caches import clear_run_caches
    from fedsim.scenario import parse_scenario

    clear_run_caches()  # a cell pays its own noise solve, whichever cells ran before in this process
    start = time.perf_counter()
    record: dict[str, Any] = {"cell_id": cell.cell_id, "attack": cell.attack, "defense": cell.defense,
                              "params": cell.params, "repeat": cell.repeat, "seed": cell.seed}
    try:
        # overwrite: a run directory of this cell left by a run killed before its record was appended
        # (only ever a fedsim run directory: anything else there is refused and the cell fails)
        with torch_threads(int(num_cpus)):
            result = run_scenario(parse_scenario(cell.scenario), Path(out_dir) / "cells" / cell.cell_id,
                                  overwrite=True)
        record.update(status="ok", error=None, run_dir=f"cells/{cell.cell_id}", summary=summarize_run(result))
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the bench
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", run_dir=None, summary={})
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def failed_record(cell: Cell, error: str, seconds: float) -> dict[str, Any]:
    return {"cell_id": cell.cell_id, "attack": cell.attack, "defense": cell.defense, "params": cell.params,
            "repeat": cell.repeat, "seed": cell.seed, "status": "failed", "error": error, "seconds": round(seconds, 3),
            "run_dir": None, "summary": {}}
