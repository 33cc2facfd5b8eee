"""One bounded pool of Ray tasks, shared by the bench's cells and a run's attack jobs.

:func:`local_or_joined_ray` starts a Ray for the block when none runs in this process (a local one is told
where this checkout is, so workers import it even when fedsim is not pip-installed) and shuts down only the
one it started. :func:`run_bounded` submits items in order, at most ``limit`` in flight, and hands each to
``finish`` as it ends, with its result or the error ``ray.get`` raised (a dead worker is a failed item, not a
failed run); on any exception, Ctrl-C included, the tasks in flight are cancelled and the exception re-raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def export_source_path() -> None:
    """Let a local Ray's workers import this fedsim checkout even when it is not pip-installed."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


@contextmanager
def local_or_joined_ray(init_args: dict[str, Any]) -> Iterator[None]:
    """``ray.init(**init_args)`` for the block unless Ray already runs here; a Ray started here is shut down."""
    import ray

    started = not ray.is_initialized()
    if started:
        if "address" not in init_args:
            export_source_path()
        ray.init(**init_args)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cpu_slots(num_cpus: float) -> int:
    """How many tasks of ``num_cpus`` CPUs the cluster holds at once (at least 1): the default in-flight bound."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))


def run_bounded(items: Sequence[T], submit: Callable[[T], Any], limit: int,
                finish: Callable[[T, Any, BaseException | None], None]) -> None:
    """``submit(item) -> ObjectRef`` for each item in order with at most ``limit`` in flight; ``finish(item,
    result, error)`` in the driver as each ends (``error`` is what ``ray.get`` raised, else None)."""
    import ray

    pending = list(reversed(items))
    in_flight: dict[Any, T] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                item = pending.pop()
                in_flight[submit(item)] = item
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                item = in_flight.pop(ref)
                try:
                    result, error = ray.get(ref), None
                except Exception as exc:  # noqa: BLE001 - a dead worker is a failed item, not a failed run
                    result, error = None, exc
                finish(item, result, error)
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
