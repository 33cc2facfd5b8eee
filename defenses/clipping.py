"""Global L2 norm clipping of the client's update (GIFD/GGL ``defense.py``; the clipping half of DP).

The whole update, all tensors together, is rescaled to norm at most C:
``u <- u * min(1, C / (||u||_2 + 1e-6))``. Deterministic, so ``attacker_transform`` applies the same
rule to an attacker's dummy update (differentiably). Note that clipping one update only rescales it:
an attack matching gradient *directions* (the cosine distance of Inverting Gradients) is unaffected.
Clipping protects only together with noise (DP) or by bounding each client's weight in the aggregate.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense

EPS = 1e-6  # as GGL/GIFD: clip_coef = max_norm / (total_norm + 1e-6)


class ClippingParams(DefenseParams):
    max_norm: float = Field(4.0, gt=0, description="C: the largest global L2 norm an update may have")


def global_norm(update: dict[str, Tensor]) -> Tensor:
    """L2 norm of all entries of all tensors together."""
    return torch.sqrt(sum((v.double() ** 2).sum() for v in update.values()))


def clip_update(update: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``update`` scaled to global L2 norm <= ``max_norm`` (returned unchanged if already inside)."""
    if not update:
        return dict(update)
    coef = max_norm / (global_norm(update) + EPS)
    if coef >= 1:
        return dict(update)
    return {k: v * coef.to(v.dtype) for k, v in update.items()}


@register_defense("clipping")
class Clipping(Defense):
    Params = ClippingParams
    stage = 50
    sensitivity_preserving = True  # a projection onto a ball: non-expansive
    summary = "scales the client's update to global L2 norm <= C"

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return clip_update(update, self.params.max_norm), {}

    def attacker_transform(self, update: dict[str, Tensor]) -> dict[str, Tensor]:
        return clip_update(update, self.params.max_norm)
