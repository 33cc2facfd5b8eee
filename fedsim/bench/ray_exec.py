"""The Ray executor: one remote task per cell, at most ``max_parallel`` in flight, records as they finish.

Tasks are not retried (``max_retries=0``): a cell whose worker dies (out of memory, killed) is
recorded as failed with Ray's error, like a cell that raised. On Ctrl-C the tasks in flight are
cancelled and a Ray started here is shut down; the store keeps every cell finished so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fedsim.bench.cell import failed_record, run_cell
from fedsim.bench.expand import Cell
from fedsim.bench.grid import Grid
from fedsim.ray_jobs import cpu_slots, local_or_joined_ray, run_bounded
from fedsim.scenario import BackendSpec
from fedsim.simulation.ray_backend import backend_config, quiet_environment


def init_args(grid: Grid, verbose: bool = False) -> dict[str, Any]:
    """fedsim's quiet ``ray.init`` arguments for a local Ray, or for joining ``grid.ray.address``."""
    spec = BackendSpec(address=grid.ray.address, init_args=dict(grid.ray.init_args))
    return backend_config(spec, verbose)["init_args"]


def run_on_ray(grid: Grid, cells: list[Cell], out_dir: str, finish: Callable[[dict[str, Any]], None],
               max_parallel: int | None, verbose: bool = False) -> None:
    """Run ``cells`` as Ray tasks; ``finish(record)`` is called in the driver as each one ends."""
    quiet_environment(verbose)
    import ray

    res = grid.resources
    remote = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0)(run_cell)
    began: dict[int, float] = {}

    def submit(cell: Cell) -> Any:
        began[id(cell)] = time.perf_counter()
        return remote.remote(cell, out_dir, res.num_cpus)

    def done(cell: Cell, record: Any, error: BaseException | None) -> None:
        if error is not None:
            record = failed_record(cell, f"{type(error).__name__}: {error}".splitlines()[0],
                                   time.perf_counter() - began[id(cell)])
        finish(record)

    with local_or_joined_ray(init_args(grid, verbose)):
        run_bounded(cells, submit, max_parallel or cpu_slots(res.num_cpus), done)
