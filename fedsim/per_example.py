"""Per-example clipping of gradients held as a parameter dict, and the step length that sets DIFF2's clip
radius, shared by the DIFF2 client (:mod:`fedsim.defenses.diff2_client`) and the attacker's model of it
(:mod:`fedsim.attacks.differences`), so the clip the server models is the clip the client applied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

TINY = 1e-30  # a squared per-example norm this small counts as zero: no clipping, and no NaN in a backward pass


def clip_per_example(grads: Mapping[str, Tensor], radius: float) -> dict[str, Tensor]:
    """``g_i * min(1, radius / ||g_i||_2)`` for every example i, the norm taken over all parameters at once.

    ``grads``: name -> (B, *param shape) per-example gradients. Differentiable (attacks backpropagate through
    it); a zero gradient stays zero.
    """
    squares = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    factor = torch.clamp(radius / torch.sqrt(squares.clamp_min(TINY)), max=1.0)  # (B,)
    return {k: g * factor.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def step_norm(current: Mapping[str, Tensor], previous: Mapping[str, Tensor], names: list[str]) -> float:
    """``||x_r - x_{r-1}||_2`` over ``names`` (in float64 on the CPU, in that order): the server, every client
    and the attacker compute it from the same tensors, so all get the same number."""
    total = torch.zeros((), dtype=torch.float64)
    for k in names:
        diff = torch.as_tensor(current[k]).detach().to("cpu", torch.float64)
        total += (diff - torch.as_tensor(previous[k]).detach().to("cpu", torch.float64)).pow(2).sum()
    return float(total.sqrt())
