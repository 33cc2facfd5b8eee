"""Robbing the Fed on this CPU: seconds and the fraction of a batch recovered above 40 dB PSNR.

For each case (bundled MNIST digits batch 64 and bundled CIFAR-10 batch 16, ConvNet, FedSGD; MNIST with FedAvg
of several local steps) it builds the manipulated model from ``manipulate()``, computes the client's update on the
batch, and prints the seconds of ``manipulate`` and of ``reconstruct`` (the attack's whole cost; the client's own
training is not the attacker's) and the fraction of the batch matched one-to-one above 40 dB, beside the PSNR of the
batch's mean image (the trivial attacker).

    OMP_NUM_THREADS=1 python benchmarks/rtf_speed.py [--bins 256] [--thresholds auxiliary|prior]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rtf_support import client_update, observed, psnr_matched, rtf_attack, setup, view_for  # noqa: E402


def case(dataset: str, batch: int, protocol: str, steps: int, args: argparse.Namespace) -> None:
    bundle, _, task, net = setup(dataset, protocol=protocol)
    x, y = bundle.train_x[:batch], bundle.train_y[:batch]
    attack = rtf_attack(bins=args.bins, thresholds=args.thresholds, measurement=args.measurement)
    t0 = time.perf_counter()
    sent = attack.manipulate(view_for(task, net, bundle.test_x))
    t1 = time.perf_counter()
    upd = client_update(task, sent, x, y, steps=steps, lr=args.lr)
    t2 = time.perf_counter()
    rec = attack.reconstruct(observed(task, sent, upd, batch))
    t3 = time.perf_counter()
    if rec.failed:
        print(f"{dataset} b{batch} {protocol} steps {steps}: failed: {rec.failed}")
        return
    psnr = psnr_matched(rec.images, x)
    trivial = psnr_matched(x.mean(0, keepdim=True).expand_as(x), x).mean()
    print(f"{dataset:13s} batch {batch:3d} {protocol:6s} steps {steps}: attack {t1 - t0 + t3 - t2:.3f} s "
          f"(manipulate {t1 - t0:.3f}, reconstruct {t3 - t2:.3f}; client {t2 - t1:.2f} s), returned "
          f"{rec.images.shape[0]}, >40 dB {float((psnr > 40).double().mean()):.3f}, trivial mean image "
          f"{float(trivial):.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, default=256)
    parser.add_argument("--thresholds", default="auxiliary", choices=("auxiliary", "prior"))
    parser.add_argument("--measurement", default="random", choices=("random", "mean"))
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case("mnist-5k", 64, "fedsgd", 1, args)
    case("cifar10-mini", 16, "fedsgd", 1, args)
    for steps in (2, 4):
        case("mnist-5k", 64, "fedavg", steps, args)


if __name__ == "__main__":
    main()
