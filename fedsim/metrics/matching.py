"""One-to-one matching of reconstructions to the ground-truth batch before scoring.

Gradient inversion recovers a batch in arbitrary order, so images are paired by an optimal
assignment (Hungarian method, ``scipy.optimize.linear_sum_assignment``) on the full cost matrix, as
breaching does (``breaching/analysis/analysis.py``, there on LPIPS). Greedy best-match, as in
GradAttack, may pair two truths with one reconstruction or pick a worse pairing; it is never used.

Unequal counts: min(B_r, B_t) pairs are formed. A truth image left without a reconstruction gets
index -1 (the scorer then counts it as a failure); surplus reconstructions stay unused.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fedsim.metrics.image import to_unit_range
from fedsim.metrics.lpips import get_lpips

MatchCost = Literal["mse", "lpips"]


def mse_matrix(recon: Tensor, truth: Tensor) -> Tensor:
    """MSE between every reconstruction and every truth image, shape (B_r, B_t), float64."""
    r = to_unit_range(recon).flatten(1).double()
    t = to_unit_range(truth).flatten(1).double()
    if r.shape[1] != t.shape[1]:
        shapes = f"{tuple(recon.shape[1:])} and {tuple(truth.shape[1:])}"
        raise ValueError(f"cannot compare images of shapes {shapes}")
    dist = torch.cdist(r, t, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.pow(2) / r.shape[1]


def cost_matrix(recon: Tensor, truth: Tensor, cost: MatchCost = "mse") -> tuple[np.ndarray, str]:
    """The (B_r, B_t) matching cost and the cost actually used.

    ``cost="lpips"`` falls back to "mse" when LPIPS is unavailable (:func:`get_lpips` logs why).
    """
    if cost not in ("mse", "lpips"):
        raise ValueError(f"unknown matching cost {cost!r}; use 'mse' or 'lpips'")
    if cost == "lpips":
        scorer = get_lpips()
        if scorer is not None:
            return scorer.matrix(recon, truth).double().numpy(), "lpips"
    return mse_matrix(recon, truth).numpy(), "mse"


def assign(cost: np.ndarray) -> np.ndarray:
    """Optimal assignment for a (B_r, B_t) cost matrix: for each truth column, its row or -1."""
    order = np.full(cost.shape[1], -1, dtype=np.int64)
    if cost.size:
        rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e30, posinf=1e30, neginf=-1e30))
        order[cols] = rows
    return order


def match_batches(recon: Tensor, truth: Tensor, cost: MatchCost = "mse") -> np.ndarray:
    """For each ground-truth index ``i``, the index of its reconstruction (``-1``: none left).

    Minimises the summed cost over all pairs (Hungarian). ``recon[order[i]]`` is scored against
    ``truth[i]``. With "mse" the pairing minimises total pixel error, which is the order most
    favourable to the attacker for PSNR/MSE, so leakage is never understated by a bad order.
    """
    return assign(cost_matrix(recon, truth, cost)[0])
