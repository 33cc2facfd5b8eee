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
from fedsim.ray_jobs import cpu_slots, local_or_joined_ray, run_bounded
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

        remote = ray.remote(max_retries=0)(ray_task)
        bars: dict[tuple, ProgressFn | None] = {}

        def submit(job: AttackJob) -> Any:
            bars[job.key] = progress(job.label, job.total) if progress else None
            return remote.options(**job_resources(job)).remote(portable(job))

        def finish(job: AttackJob, result: Any, error: BaseException | None) -> None:
            if error is None:
                out = restored(result)
            else:
                reason = f"{type(error).__name__}: {error}".splitlines()[0]
                out = AttackResult(job.key, Reconstruction.failure(f"Ray task failed: {reason}"), 0.0)
            bar = bars.pop(job.key)
            if bar is not None:
                bar(job.total, job.total)
            done(out)

        with local_or_joined_ray(self.init_args()):
            limit = self.max_parallel  # None: as many as fit; Ray queues the rest, this bounds the bookkeeping
            limit = limit or cpu_slots(min(job_resources(j)["num_cpus"] for j in jobs))
            run_bounded(list(jobs), submit, limit, finish)
