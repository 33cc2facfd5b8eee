"""Building blocks shared by every model: normalization, activation and mask-aware dropout.

All blocks are safe for double backward (gradient inversion differentiates the gradient): nothing
works in place, so ``torch.autograd.grad(..., create_graph=True)`` followed by ``backward`` works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NORM_KINDS = ("none", "batch", "group")
ACTIVATIONS = ("relu", "sigmoid", "gelu", "tanh")


def make_norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A normalization layer for ``channels`` features: BatchNorm, GroupNorm or Identity.

    ``dims`` is 2 for (N, C, H, W) feature maps and 1 for (N, C) vectors. GroupNorm uses
    ``gcd(32, channels)`` groups on feature maps: 32 groups for the usual power-of-two widths, and
    always a divisor of ``channels`` for odd widths; one group on vectors (GroupNorm, unlike
    BatchNorm, is what DP-SGD can use).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "group":
        # For (N, C) vectors every group must span several features (one feature per group would be
        # normalized to its own bias), so vectors use a single group: a LayerNorm with per-feature affine.
        return nn.GroupNorm(math.gcd(32, channels) if dims == 2 else 1, channels)
    raise ValueError(f"unknown norm kind {kind!r} (known: {', '.join(NORM_KINDS)})")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name; ReLU is never in place (in-place ops break double backward)."""
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")


class MaskDropout(nn.Module):
    """Dropout whose mask can be recorded or imposed (Scheliga et al., AAAI 2023, "DIA").

    * A mask set with :meth:`set_mask` is always applied as ``h * mask / (1 - p)``, in train and
      eval mode alike. The Dropout Inversion Attack optimizes such continuous masks; the WIIG oracle
      sets the client's true ones. The mask is kept by reference, so gradients reach it.
    * Otherwise, in train mode with ``p > 0``, a Bernoulli(1 - p) mask of the activation's full shape
      is drawn from the global torch RNG and applied with the same scaling; when recording is on it
      is kept in :attr:`last_mask`.
    * Otherwise the layer is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.mask: Tensor | None = None
        self.record = False
        self.last_mask: Tensor | None = None

    def set_mask(self, mask: Tensor | None) -> None:
        """Impose ``mask`` on every later forward pass (``None`` goes back to random dropout)."""
        self.mask = mask

    def forward(self, h: Tensor) -> Tensor:
        if self.mask is not None:
            return h * self.mask / (1.0 - self.p)
        if not self.training or self.p == 0.0:
            return h
        mask = torch.empty_like(h, requires_grad=False).bernoulli_(1.0 - self.p)
        if self.record:
            self.last_mask = mask
        return h * mask / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_layers(model: nn.Module) -> dict[str, MaskDropout]:
    """Every :class:`MaskDropout` in ``model``, by qualified module name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskDropout)}


def record_masks(model: nn.Module, on: bool) -> None:
    """Switch mask recording on or off in every dropout layer; previously recorded masks are dropped."""
    for layer in dropout_layers(model).values():
        layer.record = on
        layer.last_mask = None


def recorded_masks(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the masks drawn in the last train-mode forward pass (layers not yet run are absent)."""
    return {
        name: layer.last_mask.clone()
        for name, layer in dropout_layers(model).items()
        if layer.last_mask is not None
    }


def set_masks(model: nn.Module, masks: dict[str, Tensor] | None) -> None:
    """Impose ``masks`` (by layer name, as from :func:`recorded_masks`); ``None`` clears every mask.

    Layers missing from ``masks`` are cleared; a name that is not a dropout layer is an error.
    """
    layers = dropout_layers(model)
    masks = masks or {}
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise KeyError(f"not dropout layers of this model: {', '.join(unknown)} (known: {', '.join(layers)})")
    for name, layer in layers.items():
        layer.set_mask(masks.get(name))
