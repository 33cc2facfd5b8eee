"""The weight perturbation of sharpness-aware training (SAM, Foret et al., ICLR 2021), shared by
``dp_sat`` and ``dp_sam``: ``w -> w + e`` with ``e = rho * d / ||d||_2`` for one logical step, then back
to EXACTLY ``w``.

The global L2 norm runs over all trainable parameters together (one flat vector). ``w`` is restored
from a copy taken before the perturbation, not by subtracting ``e``: ``(w + e) - e`` is not ``w`` in
floating point, and a perturbation is removed once whatever happens between (the official DP-SAT code
adds ``e`` on every physical sub-batch and subtracts it once, leaving ``+e`` in the weights; see
``shared/reference/algorithms-more.md`` section 10.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """One vector of all ``tensors`` (detached), in order: shape (sum of numels,)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def cosine(a: Tensor, b: Tensor) -> float | None:
    """cos(a, b) of two flat vectors, or None when either is zero (no direction)."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return float(torch.dot(a, b) / (na * nb))


class Perturbation:
    """Moves ``params`` to ``w + rho * d / ||d||`` for one step and restores ``w`` bit for bit.

    ``apply`` is idempotent within a step: a second call while perturbed changes nothing, so every
    forward pass of one logical step (several physical sub-batches, or DP-SAM's second query) sees the
    same ``w + e``; ``remove`` restores ``w`` and ends the step.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.saved: list[Tensor] | None = None

    @property
    def active(self) -> bool:
        """Whether a step is open (``apply`` ran and ``remove`` has not)."""
        return self.saved is not None

    @torch.no_grad()
    def apply(self, direction: Tensor | None, rho: float) -> bool:
        """Open a step at ``w`` and move to ``w + rho * direction / ||direction||`` (``direction`` flat, as
        :func:`flat` of the params; None, zero or ``rho`` 0 leave ``w`` as it is). True when the weights moved."""
        if self.saved is not None:
            return False  # this step is already open: e is applied once per logical step
        self.saved = [p.detach().clone() for p in self.params]
        if direction is None or rho == 0:
            return False
        norm = direction.norm()
        if not torch.isfinite(norm) or norm == 0:
            return False
        step = direction.to(self.params[0].device) * (rho / norm)
        offset = 0
        for p in self.params:
            p.add_(step[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return True

    @torch.no_grad()
    def remove(self) -> list[Tensor]:
        """Restore ``w`` exactly and close the step; returns ``w`` (the copies). Raises RuntimeError when no
        step is open (a second removal would be the double-removal bug)."""
        if self.saved is None:
            raise RuntimeError("sharpness perturbation removed twice (no step is open)")
        saved, self.saved = self.saved, None
        for p, w in zip(self.params, saved, strict=True):
            p.copy_(w)
        return saved
