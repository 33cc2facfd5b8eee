"""Laplace noise on the client's update (the Laplace counterpart of ``gaussian_noise``).

Every entry gets i.i.d. Laplace(0, b) noise (density ``exp(-|x|/b) / 2b``, standard deviation
``b * sqrt(2)``), drawn from a generator derived from (seed, name, round, partition id), so runs are
reproducible; the noise tensor is recorded as ground truth for the evaluator. Samples are
``b * (E1 - E2)`` with E1, E2 ~ Exp(1), which a seeded ``torch.Generator`` can draw (torch's
``Laplace`` distribution cannot take one). Laplace noise is the mechanism of epsilon-DP for an L1
sensitivity, but nothing here bounds the sensitivity: this is a perturbation, not calibrated DP.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense
from fedsim.seeding import torch_generator


class LaplaceNoiseParams(DefenseParams):
    scale: float = Field(0.01, ge=0, description="Laplace scale b (standard deviation b*sqrt(2))")


def laplace_like(value: Tensor, scale: float, gen: torch.Generator) -> Tensor:
    """Laplace(0, ``scale``) noise of ``value``'s shape, drawn on the CPU from ``gen``."""
    e1 = torch.empty(value.shape, dtype=torch.float32).exponential_(generator=gen)
    e2 = torch.empty(value.shape, dtype=torch.float32).exponential_(generator=gen)
    return ((e1 - e2) * scale).to(device=value.device, dtype=value.dtype)


@register_defense("laplace_noise")
class LaplaceNoise(Defense):
    Params = LaplaceNoiseParams
    stage = 50
    sensitivity_preserving = True  # noise drawn independently of the data
    summary = "adds Laplace(0, b) noise to every entry of the client's update"

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        gen = torch_generator(ctx.seed, "laplace_noise", self.name, ctx.round, ctx.partition_id)
        noisy, noise = {}, {}
        for key, value in update.items():
            eps = laplace_like(value, self.params.scale, gen)
            noisy[key] = value + eps
            noise[f"noise/{key}"] = eps
        return noisy, noise
