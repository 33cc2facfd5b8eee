"""Per-layer magnitude pruning of the client's update (Zhu, Liu, Han, NeurIPS 2019, Sec. 6; GGL/GIFD
``defense.py``).

Deep Leakage from Gradients evaluates "gradient pruning" as a defense: in every tensor of the update,
the entries whose magnitude is below the p-th percentile of that tensor's ``|g|`` are set to zero
(Zhu et al. report that leakage stops only at about 20% or more pruned; GIFD's default is p = 20).
The percentile is numpy's default (linear interpolation between order statistics) and the comparison
is strict, as in GIFD, so about p% of each tensor becomes zero (more with ties, e.g. already-zero
entries). Deterministic: ``attacker_transform`` applies the same rule to a dummy update, keeping it
differentiable (the mask is computed from detached magnitudes).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense


class PruningParams(DefenseParams):
    percent: float = Field(20.0, ge=0, le=100, description="p: prune entries below the p-th percentile of |g|")


def percentile(values: Tensor, p: float) -> Tensor:
    """The p-th percentile of a flat tensor, linear interpolation (``numpy.percentile``'s default);
    unlike ``torch.quantile`` it takes tensors of any size."""
    ordered = values.flatten().sort().values
    pos = p / 100.0 * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def prune_tensor(value: Tensor, percent: float) -> Tensor:
    """``value`` with entries of magnitude below the ``percent``-th percentile of ``|value|`` zeroed."""
    if value.numel() == 0 or percent <= 0:
        return value
    magnitude = value.detach().abs()
    keep = magnitude >= percentile(magnitude, percent)
    return value * keep.to(value.dtype)


def prune_update(update: dict[str, Tensor], percent: float) -> dict[str, Tensor]:
    """Per-tensor magnitude pruning of every tensor of ``update``."""
    return {k: prune_tensor(v, percent) for k, v in update.items()}


@register_defense("pruning")
class Pruning(Defense):
    Params = PruningParams
    stage = 50
    summary = "zeroes, per tensor, the update entries below the p-th percentile of |g|"

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return prune_update(update, self.params.percent), {}

    def attacker_transform(self, update: dict[str, Tensor]) -> dict[str, Tensor]:
        return prune_update(update, self.params.percent)
