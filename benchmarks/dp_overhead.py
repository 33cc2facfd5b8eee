"""DP-SGD overhead: the time of one Opacus DP training step against one plain step, per model and mode.

Each step is the one fedsim's client runs (``local_update``'s fedavg loop: zero_grad, forward, loss,
backward, optimizer step) on a batch of CIFAR-shaped inputs; the DP step goes through the
``dp_sgd`` defense itself (Opacus per-sample gradients in ``hooks``, ``functorch``, ``ew`` or
``ghost`` mode, per-example clipping, noise; Abadi et al. 2016, ghost clipping: Li et al. 2022).
All variants are timed in one process, alternating (plain, then each mode, repeated), and each
reports its best of N trials, so drifting load on a shared machine hits them alike. Target: a DP
step at most 2.5x a plain step. One torch thread, as a fedsim client with ``num_cpus: 1`` has.

Per-sample gradients (``hooks``, ``functorch``, ``ew``) cost batch_size x the model's size in memory
traffic: cheap for conv nets, whose weights are small next to their activations, but dozens of
times a plain step for the MLP, whose first layer holds 1.6 M weights; ghost clipping never builds
them (two backward passes and the noise, one Gaussian draw per weight, are then what it costs).

    python benchmarks/dp_overhead.py [--batch-size 32] [--trials 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsim.defenses.dp_sgd import DPSGD, DPSGDParams
from fedsim.models import build_model
from fedsim.scenario import LocalTraining, ModelSpec
from fedsim.training import TrainingJob

SHAPE = (3, 32, 32)
TARGET = 2.5


def make_step(model_name: str, mode: str, batch_size: int):
    """A closure running one training step of ``model_name`` (plain when ``mode`` is 'plain')."""
    model = build_model(ModelSpec(name=model_name, width=32), SHAPE, 10, seed=0)
    n = 50 * batch_size
    local = LocalTraining(batch_size=batch_size, lr=0.05, steps=1)
    job = TrainingJob(model, seed=0, round=1, partition_id=0, num_examples=n)
    if mode != "plain":
        defense = DPSGD(DPSGDParams(noise_multiplier=1.0, grad_sample_mode=mode), "dp_sgd")
        job = defense.wrap_training(job)
        job.sample_batches(n, local, "fedavg", torch.Generator().manual_seed(0))  # fixes q and sigma
    opt = job.make_optimizer(job.model, local)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn((batch_size, *SHAPE), generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)
    job.model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = job.loss_fn(job.model(x), y)
        loss.backward()
        opt.step()

    return step


def best_times(models: list[str], modes: list[str], batch_size: int, trials: int, steps: int) -> dict:
    """Best-of-``trials`` seconds per step for every (model, mode), variants alternating in each trial."""
    steppers = {(m, mode): make_step(m, mode, batch_size) for m in models for mode in ["plain", *modes]}
    for step in steppers.values():  # warm-up: first calls allocate and (functorch) trace
        step()
        step()
    best = dict.fromkeys(steppers, float("inf"))
    for _ in range(trials):
        for key, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[key] = min(best[key], (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet", "convnet"])
    parser.add_argument("--modes", nargs="+", default=["hooks", "functorch", "ew", "ghost"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    best = best_times(args.models, args.modes, args.batch_size, args.trials, args.steps)
    print(f"batch {args.batch_size}, best of {args.trials} x {args.steps} steps, 1 thread; "
          f"ratio = DP step / plain step (target <= {TARGET})")
    print(f"{'model':<8} {'plain ms':>9} " + " ".join(f"{m:>10}" for m in args.modes))
    worst, fastest = 0.0, []
    for m in args.models:
        plain = best[(m, "plain")]
        ratios = dict(zip(args.modes, (best[(m, mode)] / plain for mode in args.modes), strict=True))
        worst = max(worst, *ratios.values())
        fastest.append(f"{m} {min(ratios, key=ratios.get)} {min(ratios.values()):.2f}x")
        print(f"{m:<8} {plain * 1e3:>9.2f} " + " ".join(f"{r:>9.2f}x" for r in ratios.values()))
    print(f"worst ratio {worst:.2f}x: {'within' if worst <= TARGET else 'ABOVE'} the {TARGET}x target")
    print("fastest mode per model: " + ", ".join(fastest))


if __name__ == "__main__":
    main()
