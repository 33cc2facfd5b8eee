"""Attack jobs and the executors that run them: serially in the driver, or as Ray tasks.

A job (:class:`AttackJob`) is one attack on one view: a :class:`~fedsim.threat.ClientUpdate` built by
:func:`fedsim.attacking.observe`, or a :class:`~fedsim.threat.ReleasedModel` for model inversion. It carries the
attack's view only, never ground truth: the driver keeps each job's captured update and scores the
:class:`AttackResult` against it after the job returns (:mod:`fedsim.attacking`). :func:`run_job` is the one
place an attack runs, on either path: the attack is built and run with the job's torch threads
(``attacks[i].resources.num_cpus``, else the driver's count) and the global RNGs seeded from the job's seed,
``derive_seed(seed, "attack", attack index, round, client)``, so a result depends on (round, client, attack index),
never on which job ran before it in the process; an exception becomes a failed :class:`Reconstruction` with the
same ``"Type: message"`` on both paths.

Executors call ``done(result)`` in the driver as each job ends (in any order: results are keyed by
:attr:`AttackJob.key`, the job's place in the run's outcome order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

import torch

from fedsim.isolation import seeded_global_rngs, torch_threads
from fedsim.scenario import AttackSpec
from fedsim.threat import ClientUpdate, Reconstruction, ReleasedModel

ProgressFn = Callable[[int, int], None]
ProgressFactory = Callable[[str, int], ProgressFn]  # (label, total) -> progress fn


@dataclass(frozen=True)
class AttackJob:
    """One attack on one view, as shipped to wherever it runs (no ground truth).

    ``key``: its place in the run's outcome order; ``view``: the attack's view; ``seed``: from
    :func:`fedsim.seeding.derive_seed` over (scenario seed, "attack", attack index, round, client);
    ``threads``: torch threads it runs with; ``label``/``total``: its progress bar (iterations × restarts)."""

    key: int
    spec: AttackSpec
    view: ClientUpdate | ReleasedModel
    seed: int
    device: torch.device
    threads: int
    label: str
    total: int


@dataclass(frozen=True)
class AttackResult:
    """What a job returns: the attack's reconstruction and its wall time in seconds (the attack call only)."""

    key: int
    reconstruction: Reconstruction
    seconds: float


def run_job(job: AttackJob, progress: ProgressFn | None = None) -> AttackResult:
    """Build and run ``job``'s attack with ``job.threads`` torch threads (the caller's count restored after) and
    the global RNGs seeded from ``job.seed`` (torch's CPU and device generator as ``torch.manual_seed`` would,
    NumPy's, Python's; :func:`fedsim.isolation.seeded_global_rngs`). Every executor runs a job through here, so
    both compute with the same thread count (it changes float summation order). An exception while seeding,
    building or running the attack is a failed reconstruction (``"Type: message"``), never a failed run."""
    from fedsim.plugins import attack_registry

    start = time.perf_counter()  # the attack's set-up (a prior it loads) counts as its time
    with torch_threads(job.threads):
        try:  # seeding too: a device the process cannot reach fails the same way on both executors
            with seeded_global_rngs(job.seed, job.device):
                attack = attack_registry().get(job.spec.name).from_spec(job.spec, job.device, job.seed)
                rec = _run_attack(attack, job.view, progress)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the run
            rec = Reconstruction.failure(f"{type(exc).__name__}: {exc}")
    return AttackResult(job.key, rec, time.perf_counter() - start)


def _run_attack(attack: Any, view: ClientUpdate | ReleasedModel, progress: ProgressFn | None) -> Reconstruction:
    """The attack call itself: ``reconstruct`` on an update view, ``invert`` (its target classes, default every
    class) on a released model."""
    if isinstance(view, ReleasedModel):
        classes = list(attack.params.target_classes or range(view.task.num_classes))
        return attack.invert(view, classes, progress)
    return attack.reconstruct(view, progress)


class AttackExecutor(Protocol):
    """Runs jobs; calls ``done(result)`` in the driver as each ends (any order), raises only for the driver's own
    errors (Ctrl-C): a failing job is a failed result."""

    def run(self, jobs: Sequence[AttackJob], done: Callable[[AttackResult], None],
            progress: ProgressFactory | None) -> None: ...


class SerialExecutor:
    """One job after another in this process, each with a live progress bar (the default)."""

    def run(self, jobs: Sequence[AttackJob], done: Callable[[AttackResult], None],
            progress: ProgressFactory | None) -> None:
        for job in jobs:
            fn = progress(job.label, job.total) if progress else None
            done(run_job(job, fn))


def run_all(jobs: Sequence[AttackJob], executor: AttackExecutor,
            progress: ProgressFactory | None = None) -> dict[int, AttackResult]:
    """Every job's result by key, whatever order ``executor`` finished them in. A job that never reported is an
    error here (an executor bug), not a silently missing outcome."""
    results: dict[int, AttackResult] = {}

    def done(result: AttackResult) -> None:
        if result.key in results:
            raise RuntimeError(f"attack job {result.key} reported twice")
        results[result.key] = result

    executor.run(jobs, done, progress)
    missing = [job.key for job in jobs if job.key not in results]
    if missing:
        raise RuntimeError(f"attack jobs {missing} never reported a result")
    return results


# --- shipping jobs through pickle (Ray) ----------------------------------------------------------------------------
class _Thawed(dict):
    """A read-only mapping's items in transit: ``MappingProxyType`` cannot be pickled; :func:`restored` re-freezes."""


def portable(value: Any) -> Any:
    """``value`` (a job, a result, nested dataclasses/mappings/sequences) with every ``MappingProxyType`` as a
    picklable :class:`_Thawed`; tensors are kept as they are (pickling keeps their bits)."""
    return _convert(value, to_portable=True)


def restored(value: Any) -> Any:
    """The inverse of :func:`portable`: every :class:`_Thawed` back to a read-only ``MappingProxyType``."""
    return _convert(value, to_portable=False)


def _convert(value: Any, to_portable: bool) -> Any:
    if isinstance(value, MappingProxyType if to_portable else _Thawed):
        items = {k: _convert(v, to_portable) for k, v in value.items()}
        return _Thawed(items) if to_portable else MappingProxyType(items)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _convert(getattr(value, f.name), to_portable) for f in fields(value)
                                 if f.init})
    if type(value) is dict:
        return {k: _convert(v, to_portable) for k, v in value.items()}
    if type(value) in (tuple, list):
        return type(value)(_convert(v, to_portable) for v in value)
    return value


def ray_task(job: AttackJob) -> AttackResult:
    """The body of one Ray task: run the (portable) job (:func:`run_job`, which applies its torch threads, as on
    the serial path) and return a portable result."""
    return portable(run_job(restored(job)))


def task_threads(num_cpus: float | None, driver_threads: int) -> int:
    """Torch threads of a task reserving ``num_cpus`` (None: the driver's count, so numbers match serial)."""
    return max(1, int(num_cpus)) if num_cpus is not None else max(1, driver_threads)


def job_resources(job: AttackJob) -> Mapping[str, float]:
    """What ``job``'s Ray task reserves: ``num_cpus`` (its threads when unset) and ``num_gpus``."""
    res = job.spec.resources
    return {"num_cpus": float(res.num_cpus if res.num_cpus is not None else job.threads),
            "num_gpus": float(res.num_gpus)}


def executor_for(scenario: Any, backend: str | None = None, verbose: bool = False) -> AttackExecutor:
    """The executor ``scenario.attack_execution`` asks for; ``backend`` overrides ``backend.kind`` as it does for
    the federation (:func:`fedsim.simulation.run_federation`), so the attacks use the federation's Ray."""
    execution = scenario.attack_execution
    if execution.mode == "serial":
        return SerialExecutor()
    from fedsim.attack_ray import RayExecutor

    spec = scenario.backend if backend is None else scenario.backend.model_copy(update={"kind": backend})
    return RayExecutor(spec, execution.max_parallel, verbose)
