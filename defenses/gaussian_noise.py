"""Gaussian noise on the client's update: the simplest update perturbation (GIFD ``defense.py``).

Each entry of the update gets i.i.d. N(0, sigma^2) noise drawn from a generator derived from
(seed, round, partition id), so runs are reproducible; the noise itself is recorded as ground truth.
This is not calibrated DP (no clipping, no epsilon): use the DP defenses for guarantees.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense
from fedsim.seeding import torch_generator


class GaussianNoiseParams(DefenseParams):
    sigma: float = Field(0.01, ge=0, description="standard deviation of the added noise")


@register_defense("gaussian_noise")
class GaussianNoise(Defense):
    Params = GaussianNoiseParams
    stage = 50
    sensitivity_preserving = True  # noise drawn independently of the data
    summary = "adds N(0, sigma^2) noise to every entry of the client's update"

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        gen = torch_generator(ctx.seed, "gaussian_noise", self.name, ctx.round, ctx.partition_id)
        sigma = self.params.sigma
        noisy, noise = {}, {}
        for key, value in update.items():
            eps = torch.randn(value.shape, generator=gen, dtype=torch.float32).to(value.dtype) * sigma
            noisy[key] = value + eps
            noise[f"noise/{key}"] = eps
        return noisy, noise
