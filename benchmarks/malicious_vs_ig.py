"""Malicious weights-only attacks against the honest-but-curious Inverting Gradients on the SAME batches.

For each seed it draws one batch, builds the client's FedSGD gradient on the honest model (what IG sees) and on
the manipulated model the malicious server sends (what trap weights / fishing see), and prints:

* trap weights (mlp, bundled MNIST, batch ``--trap-batch``, auxiliary calibration from the held-out digits) vs IG
  (labels known, ``--iterations``): the fraction of the batch recovered above 40 dB and the mean PSNR of each
  true image's best-matching reconstruction;
* fishing (convnet width ``--width``, bundled CIFAR-10, batch ``--fish-batch``; the target class is the rarest
  class in the batch, as a scenario author sets ``target_class``) vs IG on the same batch with the same budget
  (labels known): the PSNR of the fished image against its closest real image, and the best such PSNR among
  IG's reconstructions.

PSNR is computed here from the pixels (10 log10(1 / MSE)), independently of fedsim's scorer. Mean +- std over
the seeds.

    OMP_NUM_THREADS=1 python benchmarks/malicious_vs_ig.py [--seeds 0 1 2] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import make_update  # noqa: E402

from attacks.fishing import Fishing  # noqa: E402
from attacks.inverting_gradients import InvertingGradients  # noqa: E402
from attacks.trap_weights import TrapWeights  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec  # noqa: E402
from fedsim.threat import ManipulationView  # noqa: E402

CPU = torch.device("cpu")


def best_psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per true image (B,), the PSNR (dB) of its closest reconstruction (pixel MSE)."""
    mse = ((images.reshape(len(images), 1, -1) - truth.reshape(1, len(truth), -1)) ** 2).mean(-1)
    return -10 * torch.log10(mse.min(dim=0).values.clamp_min(1e-12))


def batch(bundle, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(bundle.train_x), generator=torch.Generator().manual_seed(seed))[:size]
    return bundle.train_x[idx], bundle.train_y[idx]


def manipulated(attack, spec, bundle, x, y, seed, **view) -> tuple:
    """(honest update, manipulated update) of batch (x, y) on a fresh model."""
    model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=seed)
    honest = make_update(model, spec, x, y, bundle)
    sent = attack.manipulate(ManipulationView(1, honest.task, honest.global_state, (0,), **view))
    model.load_state_dict(dict(sent.state))
    return honest, make_update(model, spec, x, y, bundle)


def ig(iterations: int, seed: int) -> InvertingGradients:
    return InvertingGradients(InvertingGradients.Params(), Knowledge(labels="known"),
                              Budget(iterations=iterations, restarts=1), CPU, seed)


def trap_row(args, mnist, seed: int) -> dict[str, float]:
    spec = ModelSpec(name="mlp", activation="relu")
    x, y = batch(mnist, args.trap_batch, seed)
    attack = TrapWeights(TrapWeights.Params(), Knowledge(auxiliary_data=True), Budget(iterations=1), CPU, seed)
    honest, update = manipulated(attack, spec, mnist, x, y, seed, hyperparams={"batch_size": len(x)},
                                 auxiliary=mnist.test_x)
    start = time.perf_counter()
    trap = best_psnr(attack.reconstruct(update).images, x)
    trap_s = time.perf_counter() - start
    base = best_psnr(ig(args.trap_iterations, seed).reconstruct(honest).images, x)
    return {"trap_frac40": float((trap > 40).float().mean()), "trap_psnr": float(trap.clamp(max=100).mean()),
            "trap_s": trap_s, "ig_frac40": float((base > 40).float().mean()), "ig_psnr": float(base.mean())}


def fish_row(args, cifar, seed: int) -> dict[str, float]:
    spec = ModelSpec(name="convnet", width=args.width)
    x, y = batch(cifar, args.fish_batch, seed)
    counts = torch.bincount(y, minlength=cifar.num_classes).float()
    counts[counts == 0] = float("inf")
    target = int(counts.argmin())
    budget = Budget(iterations=args.iterations, restarts=1)
    attack = Fishing(Fishing.Params(target_class=target), Knowledge(), budget, CPU, seed)
    honest, update = manipulated(attack, spec, cifar, x, y, seed)
    fished = float(best_psnr(x, attack.reconstruct(update).images).max())  # the fished image vs its closest
    base = float(best_psnr(ig(args.iterations, seed).reconstruct(honest).images, x).max())
    return {"fish_psnr": fished, "ig_best_psnr": base, "fish_margin": fished - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1000, help="IG/fishing iterations (fishing rows)")
    parser.add_argument("--trap-iterations", type=int, default=300, help="IG iterations on the trap batch")
    parser.add_argument("--trap-batch", type=int, default=64)
    parser.add_argument("--fish-batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--skip", choices=["trap", "fish"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {}
    mnist = load_dataset(DataSpec(dataset="mnist-5k"))
    cifar = load_dataset(DataSpec(dataset="cifar10-mini"))
    for seed in args.seeds:
        row = {}
        if args.skip != "trap":
            row |= trap_row(args, mnist, seed)
        if args.skip != "fish":
            row |= fish_row(args, cifar, seed)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    for k, values in rows.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{k:14s} {statistics.mean(values):8.3f} +- {std:.3f}  (n={len(values)})")


if __name__ == "__main__":
    main()
