"""What the one-run audit can catch: how often it flags noise scaled below the accounted sigma (docs/auditing.md).

The two soundness settings of tests/test_audit_soundness.py that stand for the two canary levels: ``dp_sgd``
(example canaries, DP-SGD sigma 2, max_grad_norm 10, 2 clients, 2 FedSGD rounds, 64 digits) and ``central_dp``
(client canaries, server-side fixed clipping 1, sigma 3, 100 Dirichlet clients of unequal size, all sampled,
2 FedAvg rounds).
For each the mechanism's noise std is multiplied by ``scale`` (Opacus's ``_generate_noise`` / Flower's
``add_gaussian_noise_inplace``) while the accountants still report the configured sigma: the calibration bug of
noise too small for the accounted sensitivity. Scale 1 is the honest run. The audit FLAGS a run when its verdict
is ``violation`` (the one-run lower bound at 95 % above the smallest accountant epsilon). Printed per setting, m
and scale: runs flagged of the seeds, the lower bound's median [min, max], the pooled estimate's median, seconds
per run (federation + audit).

    OMP_NUM_THREADS=1 python benchmarks/audit_power.py [--seeds 5] [--canaries 500] [--scales 0.5 0.25 0.1 0.01]
        [--settings dp_sgd central_dp] [--jobs N]

Cost: one run takes ~1 s (dp_sgd) and ~8-15 s (central_dp: 100 clients, up to 1000 canary replies a round) on a
CPU core. The default grid (m = 500, the four scales, 5 seeds, both settings) took 90 s on 2 shared cores
with ``--jobs 2``; docs/auditing.md's table (``--canaries 500 2000 --scales 1 0.5 0.25 0.1 0.01``) 6.6 minutes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import parse_scenario  # noqa: E402

BASE: dict[str, Any] = {
    "name": "audit-power", "seed": 1, "device": "cpu",
    "data": {"dataset": "digits", "partition": {"kind": "iid"}, "train_subset": 64},
    "model": {"name": "mlp", "width": 2},
    "federation": {"clients": 2, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 32, "lr": 0.01}},
    "backend": {"kind": "inprocess"}, "evaluation": {"every": 100}, "attacks": [],
    "audit": {"confidence": 0.95, "baseline": False},
}
#: setting -> (defenses, data overrides, federation overrides): tests/test_audit_soundness.py's dp_sgd-hooks and
#: central_dp-server-fixed
SETTINGS: dict[str, tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]] = {
    "dp_sgd": ([{"name": "dp_sgd", "params": {"noise_multiplier": 2.0, "max_grad_norm": 10.0}}], {}, {}),
    "central_dp": ([{"name": "central_dp", "params": {"noise_multiplier": 3.0, "clipping_norm": 1.0}}],
                   {"partition": {"kind": "dirichlet", "alpha": 0.5}, "train_subset": 400},
                   {"clients": 100, "protocol": "fedavg", "local": {"batch_size": 8, "lr": 0.05, "epochs": 1}}),
}


def scenario_raw(setting: str, m: int, seed: int) -> dict[str, Any]:
    defenses, data, federation = SETTINGS[setting]
    raw = copy.deepcopy(BASE)
    raw["seed"], raw["defenses"] = seed, copy.deepcopy(defenses)
    raw["audit"]["canaries"] = m
    raw["data"].update(copy.deepcopy(data))
    raw["federation"].update(copy.deepcopy(federation))
    return raw


def scaled_noise(stack: ExitStack, setting: str, scale: float) -> None:
    """Multiply the setting's noise std by ``scale`` for the duration of ``stack`` (the accountants untouched)."""
    if scale == 1.0:
        return
    if setting == "dp_sgd":
        import opacus.optimizers.optimizer as plain
        import opacus.optimizers.optimizer_fast_gradient_clipping as ghost

        for module in (plain, ghost):
            real = module._generate_noise
            stack.enter_context(mock.patch.object(
                module, "_generate_noise", lambda std, *a, _real=real, **k: _real(std * scale, *a, **k)))
        return
    import flwr.serverapp.strategy.dp_adaptive_clipping as adaptive
    import flwr.serverapp.strategy.dp_fixed_clipping as fixed

    for module in (fixed, adaptive):
        real = module.add_gaussian_noise_inplace
        stack.enter_context(mock.patch.object(
            module, "add_gaussian_noise_inplace", lambda arrays, std, _real=real: _real(arrays, std * scale)))


def audit_run(setting: str, m: int, seed: int, scale: float) -> tuple[dict[str, Any], float]:
    """The audit block of one run and its wall seconds."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    with ExitStack() as stack:
        scaled_noise(stack, setting, scale)
        block = run_scenario(parse_scenario(scenario_raw(setting, m, seed)), write=False).audit
    return block, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--canaries", type=int, nargs="+", default=[500])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.01])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="runs in parallel processes")
    args = parser.parse_args()
    seeds = range(1, args.seeds + 1)
    cells = [(setting, m, scale) for setting in args.settings for m in args.canaries for scale in args.scales]
    print("| setting | accountant eps (smallest) | m | noise x | flagged | lower bound median [min, max] "
          "| pooled estimate median | s / run |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {cell: [pool.submit(audit_run, *cell[:2], seed, cell[2]) for seed in seeds] for cell in cells}
        for (setting, m, scale), runs in futures.items():
            blocks, seconds = zip(*(f.result() for f in runs), strict=True)
            lbs = [b["epsilon_lower_bound"]["value"] for b in blocks]
            flagged = sum(b["verdict"] == "violation" for b in blocks)
            eps = min(blocks[0]["epsilon"].values())
            values = [b["epsilon_estimate"]["value"] for b in blocks if b["epsilon_estimate"]["value"] is not None]
            est = statistics.median(values) if values else float("nan")
            print(f"| {setting} | {eps:.2f} | {m} | {scale:g} | {flagged}/{len(blocks)} | "
                  f"{statistics.median(lbs):.2f} [{min(lbs):.2f}, {max(lbs):.2f}] | {est:.2f} | "
                  f"{statistics.mean(seconds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
