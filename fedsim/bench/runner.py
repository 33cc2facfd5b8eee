"""Run a grid's cells, serially in this process or as Ray tasks, resuming from ``cells.jsonl``.

Resume: a cell with a record in ``cells.jsonl`` (ok or failed) is skipped; a run directory left as
``cells/<id>.partial`` by a killed run is deleted (only when it carries fedsim's marker) and its cell
rerun. Records are appended by the driver only, one line per finished cell, the moment it finishes,
so Ctrl-C or a SIGKILL loses at most the cells in flight. The bench directory itself must be new,
empty or an earlier fedsim bench directory (marker ``.fedsim-output`` of kind ``bench``): fedsim
never writes into or deletes from anything else. A cell that raises is recorded as ``failed`` with
its error; the bench goes on.

Ray executor: one ``ray.remote(num_cpus=..., num_gpus=...)`` task per cell, at most ``max_parallel``
in flight, collected with ``ray.wait`` as they finish. Each cell runs its federation on the
in-process backend (no Ray simulation nested in a Ray task). Ray is started locally with fedsim's
quiet settings (no dashboard, telemetry off, a 128 MiB object store) or joins ``ray.address``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.bench.cell import run_cell
from fedsim.bench.expand import Cell, expand_grid
from fedsim.bench.grid import Grid
from fedsim.bench.store import CELLS_FILE, append_record, drop_records, read_records, repair
from fedsim.errors import FedsimError, ScenarioError
from fedsim.outputs import BENCH, RUN, claim_dir, is_empty_dir, is_owned, remove_owned

GRID_FILE = "grid.yaml"
LOCK_FILE = ".lock"


@dataclass
class BenchProgress:
    """Callbacks: ``start(total, skipped)`` once, then ``cell(record)`` per finished cell."""

    start: Callable[[int, int], None] = lambda total, skipped: None
    cell: Callable[[dict[str, Any]], None] = lambda record: None


@dataclass
class BenchResult:
    out_dir: Path
    total: int
    skipped: int
    records: list[dict[str, Any]] = field(default_factory=list)  # the cells run by THIS call

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r["status"] == "failed")


def check_finished(cells: list[Cell], out_dir: Path, done: set[str]) -> None:
    """Refuse (FedsimError) to resume when a finished cell's recorded scenario differs from the grid's:
    its record would be kept although it measured something else. New cells (a grid that grew) are fine."""
    for cell in cells:
        saved = out_dir / "cells" / cell.cell_id / "scenario.yaml"
        if cell.cell_id in done and saved.is_file():
            if yaml.safe_load(saved.read_text(encoding="utf-8")) != cell.scenario:
                raise FedsimError(f"{out_dir} holds a result of a different grid: cell {cell.cell_id} "
                                  f"({cell.attack} x {cell.defense}) ran another scenario; use another --out, "
                                  "or delete that directory to start over")


def prepare_dir(grid: Grid, cells: list[Cell], out_dir: Path, retry_failed: bool = False) -> set[str]:
    """Create or reopen a bench directory; returns the ids of cells already finished."""
    claim_dir(out_dir, BENCH, "--out", "bench directory")
    store = out_dir / CELLS_FILE
    check_finished(cells, out_dir, {r["cell_id"] for r in read_records(store)})  # refuse before rewriting anything
    repair(store)
    if retry_failed:
        drop_records(store, [r["cell_id"] for r in read_records(store) if r["status"] == "failed"])
    done = {r["cell_id"] for r in read_records(store)}
    grid_file = out_dir / GRID_FILE
    tmp = grid_file.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    os.replace(tmp, grid_file)
    cells_dir = out_dir / "cells"
    if cells_dir.is_dir():
        for stale in cells_dir.glob("*.partial"):  # a run directory a killed run was writing
            if is_owned(stale, RUN) or is_empty_dir(stale):  # never what someone else put there
                remove_owned(stale, RUN)
    return done


def check_bench(grid: Grid, cells: list[Cell], executor: str, max_parallel: int | None = None) -> None:
    """What a run checks beyond the cells' scenarios (``fedsim bench --dry-run`` runs the same, so what it accepts
    runs): the executor's name; for ``ray``, the per-cell resources this machine or Ray can never give
    (:func:`fedsim.resources.check_bench_resources`); for ``serial``, ``--max-parallel`` (it would be ignored) and
    ``resources.num_cpus`` (each cell's torch threads) above this machine's CPUs. Raises FedsimError / ScenarioError
    (one line, the field)."""
    if executor not in ("ray", "serial"):
        raise FedsimError(f"--executor: unknown executor {executor!r} (ray or serial)")
    if executor == "ray":
        from fedsim.resources import check_bench_resources

        check_bench_resources(grid, cells)  # a request this machine cannot meet would queue forever, or fail
        return
    if max_parallel is not None:
        raise FedsimError("--max-parallel: only read with --executor ray (serial runs one cell at a time): remove it")
    from fedsim.resources import available_cpus

    cpus = available_cpus()
    if grid.resources.num_cpus > cpus:
        raise ScenarioError("resources.num_cpus", f"{grid.resources.num_cpus:g}: each cell's torch threads with "
                                                  f"--executor serial, but this machine has {cpus} CPUs; ask for at "
                                                  f"most {cpus}")


def executor_notes(grid: Grid, executor: str) -> list[str]:
    """One-line notes on grid fields the executor does not read (serial: ``resources.num_gpus``, ``max_parallel``,
    which are for Ray's scheduling and change no number), so that nothing set is ignored without a word."""
    if executor != "serial":
        return []
    unused = ([f"resources.num_gpus {grid.resources.num_gpus:g}"] if grid.resources.num_gpus > 0 else []) + (
        [f"max_parallel {grid.max_parallel}"] if grid.max_parallel is not None else [])
    if not unused:
        return []
    return [f"note: --executor serial runs one cell at a time in this process on each cell's device: the grid's "
            f"{' and '.join(unused)} (Ray scheduling only) are not used"]


def run_bench(grid: Grid, out_dir: Path, executor: str = "ray", progress: BenchProgress | None = None,
              max_parallel: int | None = None, retry_failed: bool = False, verbose: bool = False,
              cells: list[Cell] | None = None) -> BenchResult:
    """Run every cell of ``grid`` not yet in ``out_dir/cells.jsonl``; ``executor`` is 'ray' or 'serial'.

    ``cells``: the grid's expansion when the caller already has it (it is validated here otherwise).
    """
    if cells is None:
        cells = expand_grid(grid)  # validates every cell before anything is written
    check_bench(grid, cells, executor, max_parallel)
    out_dir = Path(out_dir).resolve()
    claim_dir(out_dir, BENCH, "--out", "bench directory")  # new, empty or fedsim's own: nothing else is touched
    lock = open(out_dir / LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run; the OS drops it if we die
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise FedsimError(f"another fedsim bench is running in {out_dir}; wait for it or use another --out") from None
    try:
        return _run_locked(grid, out_dir, executor, progress, max_parallel, retry_failed, verbose, cells)
    finally:
        lock.close()


def _run_locked(grid: Grid, out_dir: Path, executor: str, progress: BenchProgress | None, max_parallel: int | None,
                retry_failed: bool, verbose: bool, cells: list[Cell]) -> BenchResult:
    done = prepare_dir(grid, cells, out_dir, retry_failed)
    todo = [c for c in cells if c.cell_id not in done]
    progress = progress or BenchProgress()
    result = BenchResult(out_dir, len(cells), len(cells) - len(todo))
    progress.start(result.total, result.skipped)
    store = out_dir / CELLS_FILE

    def finish(record: dict[str, Any]) -> None:
        append_record(store, record)
        result.records.append(record)
        progress.cell(record)

    if executor == "serial":
        for cell in todo:
            finish(run_cell(cell, str(out_dir), grid.resources.num_cpus))
    elif todo:
        from fedsim.bench.ray_exec import run_on_ray

        run_on_ray(grid, todo, str(out_dir), finish, max_parallel or grid.max_parallel, verbose)
    return result
