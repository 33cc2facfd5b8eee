"""Where a run's attack jobs execute: ``attack_execution`` (run level) and ``attacks[i].resources`` (per attack).

```yaml
attack_execution:
  mode: serial            # serial (default): one job after another in the driver | ray: one Ray task per job
                          # (the shorthand attack_execution: ray means {mode: ray})
  max_parallel: null      # ray only: jobs in flight at once (null: as many as Ray's CPUs fit)
attacks:
  - name: inverting_gradients
    resources: {num_cpus: 1, num_gpus: 0}   # num_cpus: the attack's torch threads (both modes; at most this
                                            # machine's CPUs) and, with ray, the CPUs its task reserves;
                                            # num_gpus (ray only, 0 in serial): GPUs per task (fractions)
```

A job is one attack on one captured update (or, for model inversion, on one released model). In ``ray`` mode the
jobs run as Ray tasks on the Ray the federation uses: ``backend.kind: ray`` joins ``backend.address`` (or starts a
local Ray with ``backend.init_args``); ``backend.kind: inprocess`` starts a local Ray for the attacks only. Each
job runs with ``int(num_cpus)`` torch threads (at least 1) on BOTH paths; ``num_cpus: null`` (the default) takes the
driver's torch thread count. So serial and ray compute with the same thread count and every number is equal
(torch's thread count changes float summation order: :mod:`fedsim.isolation`). An attack with
``budget.time_limit_s`` stops on wall time, so its numbers depend on how busy the machine is, on either path.
Validation refuses what could never run, with the field path (exit 2). In particular, when ``device`` resolves to
CUDA (``cuda``, or ``auto`` on a GPU machine), ray mode needs ``num_gpus > 0`` on every attack: Ray hides the GPUs
from a task that reserves none. No share is chosen for you: how many jobs fit on one GPU depends on the attack's
memory, which is not known before it runs, and the same file would schedule differently on a laptop and a GPU box.
Serial mode refuses what it would ignore, as it refuses ``max_parallel``: ``num_gpus > 0``, and ``num_cpus`` above
this machine's CPUs. Bench cells always attack serially (the parallelism is across cells:
:mod:`fedsim.bench.ray_exec`); a grid whose base sets ``mode: ray`` is refused at ``base.attack_execution.mode``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from fedsim.errors import ScenarioError
from fedsim.spec_base import _Strict


class AttackResources(_Strict):
    """What one Ray task of an attack reserves (``attack_execution.mode: ray``); ``num_cpus`` is also the attack's
    torch threads on the serial path, so both paths compute alike."""

    num_cpus: float | None = Field(None, gt=0, description="the attack's torch threads (at least 1) on either path, "
                                                            "and the Ray CPUs per task; null: the driver's threads")
    num_gpus: float = Field(0.0, ge=0, description="ray mode only (0 in serial): Ray GPUs per task; fractions share a "
                                                   "GPU (0.25: four tasks); "
                                                   "must be > 0 in ray mode when the device resolves to CUDA")


class AttackExecution(_Strict):
    """How a run executes its attack jobs: serially in the driver (default) or as Ray tasks."""

    mode: Literal["serial", "ray"] = Field("serial", description="serial: in the driver, one after another; "
                                                                 "ray: one Ray task per (attack, update)")
    max_parallel: int | None = Field(None, ge=1, description="ray only: tasks in flight at once "
                                                             "(null: as many as Ray's CPUs fit)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        """``attack_execution: ray`` / ``serial`` mean ``{mode: ...}``; any other non-mapping is refused by naming the
        forms (never the Python class)."""
        forms = "write serial or ray, or {mode: ray, max_parallel: 4}"
        if isinstance(data, str):
            if data not in ("serial", "ray"):
                raise ValueError(f"{data!r} is not an execution mode: {forms}")
            return {"mode": data}
        if data is not None and not isinstance(data, dict | BaseModel):
            raise ValueError(f"{data!r} is not an execution mode: {forms}")
        return data


def check_attack_execution(scenario: Any) -> None:
    """Refuse (:class:`ScenarioError` at the field) an ``attack_execution`` / ``attacks[i].resources`` that could
    never run: ray mode without Ray installed or on the zeroth-order protocol (its attacks run inside its own
    federation loop), ``max_parallel`` with serial mode (it would be ignored), a GPU share with ``device: cpu`` (the
    attack would never use it), NO GPU share when the device resolves to CUDA (Ray sets ``CUDA_VISIBLE_DEVICES=""``
    in a task reserving no GPU, so the job's CUDA device would not exist there), and, on a local Ray, more CPUs or
    GPUs per task than Ray will have."""
    execution = scenario.attack_execution
    if execution.mode == "serial":
        if execution.max_parallel is not None:
            raise ScenarioError("attack_execution.max_parallel", "only read with mode: ray (serial runs one job at "
                                                                 "a time): remove it, or set mode: ray")
        _check_serial_resources(scenario)
        return
    if scenario.federation.protocol == "zeroth_order":
        raise ScenarioError("attack_execution.mode", "ray: zeroth-order attacks run inside the federation loop "
                                                     "(fedsim.zo), not as separate jobs; use mode: serial")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ScenarioError("attack_execution.mode", "ray: Ray is not installed (pip install 'flwr[simulation]'); "
                                                     "use mode: serial") from None
    backend = scenario.backend
    on_cluster = backend.kind == "ray" and backend.address is not None
    init_args = dict(backend.init_args) if backend.kind == "ray" else {}
    from fedsim.resources import check_request
    from fedsim.training import resolve_device

    on_cuda = resolve_device(scenario.device).type == "cuda"  # the jobs' device, as the driver resolves it
    for i, spec in enumerate(scenario.attacks):
        res = spec.resources
        where = f"attacks[{i}].resources"
        if on_cuda and res.num_gpus == 0:
            raise ScenarioError(f"{where}.num_gpus", f"0, but device {scenario.device} runs the attacks on CUDA here "
                                                     "and Ray hides the GPUs from a task that reserves none (every "
                                                     "job would fail): reserve a share (0.25: four tasks per GPU), "
                                                     "or set device: cpu, or attack_execution.mode: serial")
        if res.num_gpus > 0 and scenario.device == "cpu":
            raise ScenarioError(f"{where}.num_gpus", f"{res.num_gpus:g}, but device is cpu: the attack would never "
                                                     "use the GPU it reserves (set 0, or device: auto / cuda)")
        if not on_cluster:  # a cluster's resources are not known before Ray connects
            check_request(res.num_cpus or 1.0, res.num_gpus, where, init_args, "attack task")


def _check_serial_resources(scenario: Any) -> None:
    """``attacks[i].resources`` in serial mode, by the rule ``max_parallel`` follows: nothing set is ignored.
    ``num_gpus > 0`` is refused (a serial job reserves nothing; it runs on the scenario's device), and ``num_cpus``
    (the job's torch threads here) above this machine's CPUs is refused (:func:`fedsim.resources.available_cpus`)."""
    from fedsim.resources import available_cpus, available_gpus

    cpus = available_cpus()
    for i, spec in enumerate(scenario.attacks):
        res, where = spec.resources, f"attacks[{i}].resources"
        if res.num_gpus > 0:
            machine = "; this machine has no CUDA GPU" if available_gpus() == 0 else ""
            raise ScenarioError(f"{where}.num_gpus", f"{res.num_gpus:g}: only read with attack_execution.mode: ray "
                                                     f"(a serial job reserves nothing and runs on the scenario's "
                                                     f"device{machine}): set 0, or set mode: ray")
        if res.num_cpus is not None and res.num_cpus > cpus:
            raise ScenarioError(f"{where}.num_cpus", f"{res.num_cpus:g}: the job's torch threads, but this machine has "
                                                     f"{cpus} CPUs; ask for at most {cpus}")
