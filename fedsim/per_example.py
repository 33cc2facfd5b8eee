"""Per-example clipping of gradients held as a parameter dict, shared by the DIFF2 client
(:mod:`defenses.diff2_client`) and the attacker's model of it (:mod:`attacks.differences`), so the
clip the server models is the clip the client applied.
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
