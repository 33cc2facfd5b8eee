"""The Ray executor: one remote task per cell, at most ``max_parallel`` in flight, records as they finish.

Tasks are not retried (``max_retries=0``): a cell whose worker dies (out of memory, killed) is
recorded as failed with Ray's error, like a cell that raised. On Ctrl-C the tasks in flight are
cancelled and a Ray started here is shut down; the store keeps every cell finished so far.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.bench.cell import failed_record, run_cell
from fedsim.bench.expand import Cell
from fedsim.bench.grid import Grid
from fedsim.scenario import BackendSpec
from fedsim.simulation.ray_backend import backend_config, quiet_environment


def init_args(grid: Grid, verbose: bool = False) -> dict[str, Any]:
    """fedsim's quiet ``ray.init`` arguments for a local Ray, or for joining ``grid.ray.address``."""
    spec = BackendSpec(address=grid.ray.address, init_args=dict(grid.ray.init_args))
    return backend_config(spec, verbose)["init_args"]


def _export_source_path() -> None:
    """Let a local Ray's workers import this fedsim checkout even when it is not pip-installed."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def run_on_ray(grid: Grid, cells: list[Cell], out_dir: str, finish: Callable[[dict[str, Any]], None],
               max_parallel: int | None, verbose: bool = False) -> None:
    """Run ``cells`` as Ray tasks; ``finish(record)`` is called in the driver as each one ends."""
    quiet_environment(verbose)
    import ray

    started = not ray.is_initialized()
    if started:
        if grid.ray.address is None:
            _export_source_path()
        ray.init(**init_args(grid, verbose))
    res = grid.resources
    remote = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0)(run_cell)
    if max_parallel is None:  # as many as fit; Ray queues the rest anyway, this bounds the driver's bookkeeping
        max_parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // res.num_cpus))
    pending = list(reversed(cells))
    in_flight: dict[Any, tuple[Cell, float]] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_parallel:
                cell = pending.pop()
                in_flight[remote.remote(cell, out_dir, res.num_cpus)] = (cell, time.perf_counter())
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                cell, began = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker is a failed cell, not a failed bench
                    record = failed_record(cell, f"{type(exc).__name__}: {exc}".splitlines()[0],
                                           time.perf_counter() - began)
                finish(record)
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
