"""Uniform quantization of the client's update (gradient compression used as a defense; Zhu et al.,
NeurIPS 2019, Sec. 6, evaluate low-precision gradients against DLG).

Scheme: **symmetric, per tensor, max-abs scale**. With ``L = 2**(bits-1) - 1`` levels per sign and
``s = max|g| / L``, each entry becomes ``s * round(g / s)``: an integer in ``[-L, L]`` times ``s``, so a
tensor takes at most ``2**bits - 1`` distinct values (zero included; an all-zero tensor is unchanged).
``round`` is round-half-to-even (``torch.round``), so the default scheme is deterministic and
``attacker_transform`` applies it to a dummy update, with a straight-through gradient (the value is the
quantized one, the derivative is the identity's) so gradient-matching attacks can differentiate it.

With ``stochastic: true`` rounding is unbiased instead: ``s * floor(g / s + u)`` with ``u ~ U[0, 1)``
drawn from a generator derived from (seed, name, round, partition id); ``u`` is recorded as ground
truth randomness and there is no deterministic part for an attacker to apply.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense
from fedsim.seeding import torch_generator


class QuantizationParams(DefenseParams):
    bits: int = Field(8, ge=2, le=16, description="bits per entry: 2**(bits-1) - 1 levels per sign")
    stochastic: bool = Field(False, description="unbiased stochastic rounding (seeded) instead of nearest")


def quantize_tensor(value: Tensor, bits: int, dither: Tensor | None = None) -> Tensor:
    """Symmetric per-tensor quantization of ``value`` (nearest, or ``floor(. + dither)`` if given)."""
    levels = 2 ** (bits - 1) - 1
    scale = value.detach().abs().max() / levels if value.numel() else value.new_zeros(())
    if float(scale) == 0.0:
        return value.detach().clone()
    scaled = value.detach() / scale
    ints = torch.round(scaled) if dither is None else torch.floor(scaled + dither)
    return ints.clamp(-levels, levels) * scale


@register_defense("quantization")
class Quantization(Defense):
    Params = QuantizationParams
    stage = 50
    summary = "quantizes each update tensor to `bits` bits (symmetric, max-abs scale)"

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        bits = self.params.bits
        if not self.params.stochastic:
            return {k: quantize_tensor(v, bits) for k, v in update.items()}, {}
        gen = torch_generator(ctx.seed, "quantization", self.name, ctx.round, ctx.partition_id)
        out, randomness = {}, {}
        for key, value in update.items():
            u = torch.rand(value.shape, generator=gen).to(device=value.device, dtype=value.dtype)
            out[key] = quantize_tensor(value, bits, u)
            randomness[f"dither/{key}"] = u
        return out, randomness

    def attacker_transform(self, update: dict[str, Tensor]) -> dict[str, Tensor] | None:
        if self.params.stochastic:
            return None  # all of it is random rounding: nothing deterministic to model
        # straight-through: the quantized value, with the identity's derivative
        return {k: quantize_tensor(v, self.params.bits) + (v - v.detach()) for k, v in update.items()}
