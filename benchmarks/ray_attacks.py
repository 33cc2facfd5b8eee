"""Attacks of a run as Ray tasks vs the serial path, on leakage over rounds attacking every client every round.

The scenario is ``scenarios/protocols/leakage_over_rounds.yaml`` (4-client FedAvg on bundled digits, MLP) with both
of its attacks (FedAvg inversion, Inverting Gradients) changed to ``every: 1`` and ``clients: all``: rounds x 4
clients x 2 attacks jobs. The federation runs once; the same captured updates are then attacked serially in this
process (1 torch thread) and as Ray tasks (``attack_execution.mode: ray``, ``resources.num_cpus: 1``,
``max_parallel`` = this machine's CPUs). Prints both wall times (Ray's with and without its start-up), the
speed-up, and whether every outcome is identical (metrics and stats number for number, wall times aside; images
and labels bit for bit).

    python benchmarks/ray_attacks.py [--rounds 4] [--iterations 100] [--max-parallel N]

Measured on 2 CPU cores shared with other jobs (load average 8-10 throughout), 4 rounds, 32 jobs, identical
outcomes every time: 200 iterations: serial 120.4 s, Ray 97.7 s tasks + 9.8 s start-up: 1.23x (1.12x with
start-up); 100 iterations: serial 84.8 s, Ray 75.6 s + 19.9 s: 1.12x (0.89x). The tasks' own attack time summed
to 1.5x the serial path's (172 s vs 114 s): the two workers got far less than two free cores. One round at 20
iterations (8 jobs of 0.7 s) is slower on Ray (0.46x): each worker's start-up and imports dominate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedsim.attack_tasks import SerialExecutor, executor_for
from fedsim.attacking import run_attacks
from fedsim.resources import available_cpus
from fedsim.scenario import load_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "protocols" / "leakage_over_rounds.yaml"


def _rows(outcomes: list[Any]) -> list[dict[str, Any]]:
    """metrics.json's attack rows without wall times (``seconds``, and stats named like a duration)."""
    rows = []
    for o in outcomes:
        row = o.to_json()
        row.pop("seconds")
        row["stats"] = {k: v for k, v in row["stats"].items() if "second" not in k and not k.endswith("_s")}
        rows.append(row)
    return rows


def identical(a: list[Any], b: list[Any]) -> bool:
    """Same outcomes in the same order: every number equal, images and labels bit for bit."""
    if _rows(a) != _rows(b):
        return False
    for x, y in zip(a, b, strict=True):
        for name in ("reconstruction", "labels"):
            u, v = getattr(x, name), getattr(y, name)
            if (u is None) != (v is None) or (u is not None and not torch.equal(u, v)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--max-parallel", type=int, default=available_cpus())
    args = parser.parse_args()
    load = os.getloadavg()
    torch.set_num_threads(1)  # the serial path's threads = each task's (resources.num_cpus: 1)
    overrides = [f"federation.rounds={args.rounds}", "attack_execution.mode=ray",
                 f"attack_execution.max_parallel={args.max_parallel}"]
    for i in range(2):
        overrides += [f"attacks.{i}.rounds=[1]", f"attacks.{i}.every=1", f"attacks.{i}.clients=all",
                      f"attacks.{i}.budget.iterations={args.iterations}", f"attacks.{i}.resources.num_cpus=1"]
    scenario = load_scenario(SCENARIO, overrides)
    start = time.perf_counter()
    outcome = run_federation(scenario)
    setup = setup_for(scenario)
    print(f"federation: {time.perf_counter() - start:.1f} s, {len(outcome.capture.updates)} captured updates")

    def attack(executor: Any) -> tuple[list[Any], float]:
        began = time.perf_counter()
        found = run_attacks(scenario, outcome.capture.updates, setup.task, setup.device, (), None,
                            released=outcome.released, executor=executor)
        return found, time.perf_counter() - began

    from fedsim.metrics import get_lpips

    get_lpips()  # the scorer's LPIPS network loads once per process: not part of either path's time
    serial, serial_s = attack(SerialExecutor())
    ray_executor = executor_for(scenario)
    import ray

    began = time.perf_counter()
    ray.init(**ray_executor.init_args())
    startup_s = time.perf_counter() - began
    try:
        parallel, ray_s = attack(ray_executor)
    finally:
        ray.shutdown()
    jobs = len(serial)
    print(f"jobs: {jobs} ({args.rounds} rounds x 4 clients x 2 attacks, {args.iterations} iterations each), "
          f"{available_cpus()} CPUs, max_parallel {args.max_parallel}")
    print(f"serial: {serial_s:.1f} s ({serial_s / jobs:.2f} s per job)")
    print(f"ray:    {ray_s:.1f} s tasks + {startup_s:.1f} s Ray start-up = {ray_s + startup_s:.1f} s")
    print(f"attack time summed over jobs (each job's own wall): serial {sum(o.seconds for o in serial):.1f} s, "
          f"ray {sum(o.seconds for o in parallel):.1f} s (higher: the tasks shared the CPUs with other work)")
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"speed-up: {serial_s / ray_s:.2f}x without Ray's start-up, {serial_s / (ray_s + startup_s):.2f}x with it")
    print(f"failed outcomes: serial {sum(bool(o.failed) for o in serial)}, ray {sum(bool(o.failed) for o in parallel)}")
    print(f"identical metrics, stats, images and labels: {identical(serial, parallel)}")


if __name__ == "__main__":
    main()
