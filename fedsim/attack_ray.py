"""The Ray executor of attack jobs (``attack_execution.mode: ray``): one task per job, at most ``max_parallel`` in
flight, each reserving its attack's ``resources``; results handed to the driver as they finish.

Ray is the federation's: with ``backend.kind: ray`` the same ``ray.init`` arguments (``backend.address`` joins a
cluster; else a local Ray with ``backend.init_args``); with the in-process backend a local Ray with fedsim's quiet
defaults. A Ray already initialised in this process is used as it is and left running; one started here is shut
down at the end (Flower's simulation shuts its own Ray down after the last round). Tasks are not retried
(``max_retries=0``): a task whose worker dies is a failed outcome with Ray's error, like an attack that raised.
On Ctrl-C the tasks in flight are cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedsim.attack_tasks import (
    AttackJob,
    AttackResult,
    ProgressFactory,
    ProgressFn,
    job_resources,
    portable,
    ray_task,
    restored,
)
from fedsim.scenario import BackendSpec
from fedsim.threat import Reconstruction


class RayExecutor:
    """Run attack jobs as Ray tasks on the Ray ``backend`` describes (see the module docstring)."""

    def __init__(self, backend: BackendSpec, max_parallel: int | None = None, verbose: bool = False) -> None:
        self.backend = backend
        self.max_parallel = max_parallel
        self.verbose = verbose

    def init_args(self) -> dict[str, Any]:
        """``ray.init`` arguments: the federation's for a Ray backend, fedsim's quiet local defaults otherwise."""
        from fedsim.simulation.ray_backend import backend_config

        spec = self.backend if self.backend.kind == "ray" else BackendSpec()
        return backend_config(spec, self.verbose)["init_args"]

    def run(self, jobs: Sequence[AttackJob], done: Callable[[AttackResult], None],
            progress: ProgressFactory | None) -> None:
        if not jobs:
            return
        from fedsim.simulation.ray_backend import quiet_environment

        quiet_environment(self.verbose)
        import ray

        started = not ray.is_initialized()
        if started:
            args = self.init_args()
            if "address" not in args:
                from fedsim.bench.ray_exec import _export_source_path

                _export_source_path()  # a local Ray's workers import this checkout even when not pip-installed
            ray.init(**args)
        remote = ray.remote(max_retries=0)(ray_task)
        limit = self.max_parallel
        if limit is None:  # as many as fit; Ray queues the rest anyway, this bounds the driver's bookkeeping
            least = min(job_resources(j)["num_cpus"] for j in jobs)
            limit = max(1, int(ray.cluster_resources().get("CPU", 1) // least))
        pending = list(reversed(jobs))
        in_flight: dict[Any, tuple[AttackJob, ProgressFn | None]] = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < limit:
                    job = pending.pop()
                    ref = remote.options(**job_resources(job)).remote(portable(job))
                    in_flight[ref] = (job, progress(job.label, job.total) if progress else None)
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    job, bar = in_flight.pop(ref)
                    try:
                        result = restored(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - a dead worker is a failed attack, not a failed run
                        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                        result = AttackResult(job.key, Reconstruction.failure(f"Ray task failed: {reason}"), 0.0)
                    if bar is not None:
                        bar(job.total, job.total)
                    done(result)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()
