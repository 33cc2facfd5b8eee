"""Gradient distances for gradient-matching attacks, as a lookup table.

Every entry is a pure function ``(dummy, target) -> scalar Tensor`` over two equally long lists of
per-parameter tensors: ``dummy`` is the gradient the attacker's candidate input produces (it carries
the autograd graph), ``target`` the gradient the client sent. New distances are one function plus
one entry in :data:`OBJECTIVES` (breaching's ``objective_lookup``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Distance = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]


def _check(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> None:
    if len(dummy) != len(target) or not dummy:
        raise ValueError(f"gradient lists differ in length or are empty ({len(dummy)} vs {len(target)})")


def cosine(dummy: Sequence[Tensor], target: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """Global cosine distance (Geiping et al., NeurIPS 2020, eq. 4), over all tensors at once.

    ``D = 1 - sum_l <g_l, g*_l> / (sqrt(sum_l |g_l|^2) * sqrt(sum_l |g*_l|^2) + eps)``. It is
    invariant to the scale of either gradient, so it also matches a FedAvg weight delta or a clipped
    gradient, whose magnitude differs from the client's raw gradient.
    """
    _check(dummy, target)
    dot = sum((g * t).sum() for g, t in zip(dummy, target, strict=True))
    norm_d = torch.sqrt(sum(g.pow(2).sum() for g in dummy))
    norm_t = torch.sqrt(sum(t.pow(2).sum() for t in target))
    return 1.0 - dot / (norm_d * norm_t + eps)


def l2(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Squared Euclidean distance ``sum_l |g_l - g*_l|^2`` (DLG, Zhu et al., NeurIPS 2019, eq. 4)."""
    _check(dummy, target)
    return sum((g - t).pow(2).sum() for g, t in zip(dummy, target, strict=True))


def l1(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Absolute distance ``sum_l |g_l - g*_l|_1`` (breaching's ``l1`` objective)."""
    _check(dummy, target)
    return sum((g - t).abs().sum() for g, t in zip(dummy, target, strict=True))


OBJECTIVES: dict[str, Distance] = {"cosine": cosine, "l2": l2, "l1": l1}
