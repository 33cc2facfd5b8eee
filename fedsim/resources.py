"""Resource requests checked against this machine before anything runs.

A Ray client or bench cell that asks for more CPUs than exist, or for a GPU on a machine without
CUDA, is never scheduled: Ray waits, then Flower or the bench fails minutes later with a long
traceback. ``device: cuda`` without CUDA fails only when the first model is built. These checks run
at validation (``fedsim validate`` and every run) and refuse such requests with one line naming the
field. A request is compared with what Ray will see: ``init_args.num_cpus`` / ``num_gpus`` when given
(Ray's logical resources), else this machine's CPUs (``os.cpu_count``, narrowed by the process's CPU
affinity) and CUDA devices. Joining an existing cluster (``address``) is not checked here: the
cluster's resources are not known until Ray connects.
"""

from __future__ import annotations

import os
from typing import Any

from fedsim.errors import ScenarioError


def available_cpus() -> int:
    """CPUs this process may use: ``os.cpu_count()``, narrowed by its CPU affinity where the OS has one."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)) or count)
    return max(1, count)


def available_gpus() -> int:
    """CUDA devices torch can use here (0 without CUDA)."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def check_request(num_cpus: float, num_gpus: float, field: str, init_args: dict[str, Any] | None = None,
                  what: str = "client") -> None:
    """Refuse (ScenarioError at ``field.num_cpus`` / ``field.num_gpus``) a per-``what`` request that a local
    Ray started with ``init_args`` could never schedule."""
    init_args = init_args or {}
    cpus = init_args.get("num_cpus")
    source = "init_args.num_cpus" if isinstance(cpus, int | float) else "this machine"
    cpus = float(cpus) if isinstance(cpus, int | float) else float(available_cpus())
    if num_cpus > cpus:
        raise ScenarioError(f"{field}.num_cpus", f"{num_cpus:g} CPUs per {what}, but {source} has {cpus:g}: Ray "
                                                 f"could never schedule one; ask for at most {cpus:g}")
    if num_gpus > 0:
        gpus = init_args.get("num_gpus")
        source = "init_args.num_gpus" if isinstance(gpus, int | float) else "this machine"
        gpus = float(gpus) if isinstance(gpus, int | float) else float(available_gpus())
        if gpus == 0:
            raise ScenarioError(f"{field}.num_gpus", f"{num_gpus:g} GPUs per {what}, but {source} has no CUDA GPU: "
                                                     "Ray could never schedule one; set it to 0")
        if num_gpus > gpus:
            raise ScenarioError(f"{field}.num_gpus", f"{num_gpus:g} GPUs per {what}, but {source} has {gpus:g}; ask "
                                                     f"for at most {gpus:g}")


def check_device(device: str, field: str = "device") -> None:
    """``cuda`` without a CUDA device is refused here, not when the first model is moved."""
    if device == "cuda" and available_gpus() == 0:
        raise ScenarioError(field, "cuda was requested but no CUDA device is available (use auto or cpu)")


def check_init_args(init_args: dict[str, Any], field: str) -> None:
    """Refuse a key ``ray.init`` does not take: Ray raises on it inside Flower's backend, which then
    hangs waiting for a cluster that never started. Ray's private ``_``-prefixed options pass."""
    if not init_args:
        return
    import inspect

    import ray

    known = {n for n, p in inspect.signature(ray.init).parameters.items() if p.kind is not p.VAR_KEYWORD}
    for key in init_args:
        if key not in known and not str(key).startswith("_"):
            raise ScenarioError(f"{field}.{key}", f"ray.init takes no argument {key!r} (it takes: "
                                                  f"{', '.join(sorted(known))})")


def check_scenario_resources(scenario: Any) -> None:
    """The scenario's ``device`` and, on a local Ray backend, ``backend.client_resources``. ``device: cuda`` on a
    Ray backend needs ``client_resources.num_gpus > 0``: a client actor reserving no GPU runs with
    ``CUDA_VISIBLE_DEVICES=""`` (Ray's rule), so its ``cuda`` device would not exist there."""
    check_device(scenario.device)
    backend = scenario.backend
    if backend.kind == "ray":
        check_init_args(backend.init_args, "backend.init_args")
    if backend.kind == "ray" and scenario.device == "cuda" and backend.client_resources.num_gpus == 0:
        raise ScenarioError("backend.client_resources.num_gpus", "0, but device is cuda and Ray hides the GPUs from "
                                                                 "a client reserving none (every client would fail): "
                                                                 "reserve a share (0.25: four clients per GPU), or "
                                                                 "set device: auto / cpu")
    if backend.kind == "ray" and backend.address is None:
        res = backend.client_resources
        check_request(res.num_cpus, res.num_gpus, "backend.client_resources", backend.init_args)


def check_bench_resources(grid: Any, cells: Any = ()) -> None:
    """A grid's per-cell ``resources`` for the Ray executor on a local Ray (``ray.address`` unset), and, on any
    Ray, a cell (of ``cells``, scenarios as mappings) with ``device: cuda`` while a cell task reserves no GPU (Ray
    hides the GPUs from it, so the cell would fail)."""
    check_init_args(grid.ray.init_args, "ray.init_args")
    if grid.resources.num_gpus == 0 and any(c.scenario.get("device") == "cuda" for c in cells):
        raise ScenarioError("resources.num_gpus", "0, but a cell has device: cuda and Ray hides the GPUs from a cell "
                                                  "task reserving none (the cell would fail): reserve a share (0.5: "
                                                  "two cells per GPU), or use device: auto / cpu, or --executor "
                                                  "serial")
    if grid.ray.address is None:
        check_request(grid.resources.num_cpus, grid.resources.num_gpus, "resources", grid.ray.init_args, "cell")


#: The most memory one client process may be estimated to need for a plug-in's own tensors (an attack's inserted
#: layers, its recovery matrices); validation refuses a setting above it, with the estimate, at the field that sets it.
MAX_PLUGIN_BYTES = 8 * 2**30


def memory_problem(estimate_bytes: float, what: str) -> str | None:
    """The reason to refuse a setting whose estimated memory ``estimate_bytes`` (``what``: how it was estimated)
    exceeds :data:`MAX_PLUGIN_BYTES`, or None. The reason states the estimate and the limit in GiB."""
    if estimate_bytes <= MAX_PLUGIN_BYTES:
        return None
    return (f"{what}: about {estimate_bytes / 2**30:.1f} GiB per client process (at most "
            f"{MAX_PLUGIN_BYTES / 2**30:.0f} GiB)")
