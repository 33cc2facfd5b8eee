"""Per-channel (images) or per-feature (vectors) normalization between the data's stored space and the
models' input space. Images are stored in pixel space [0, 1]; tabular features are stored already
standardized, with mean 0 and std 1 per feature, so for them both functions are the identity. Token ids
(integer tensors of a text dataset, whose mean/std are ()) pass through both unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stats(x: torch.Tensor, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``values`` on ``x``'s device and dtype, shaped to broadcast over ``x``: (C, 1, 1) for images
    ((C, H, W) or (N, C, H, W)), (d,) for feature vectors ((d,) or (N, d))."""
    stats = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    return stats.reshape(-1, 1, 1) if x.dim() >= 3 else stats.reshape(-1)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x - mean) / std`` per channel of an image batch (C, H, W) / (N, C, H, W) or per feature of a
    vector batch (d,) / (N, d), on any device. Differentiable. Integer token ids are returned as they are."""
    if not x.is_floating_point():
        return x
    return (x - _stats(x, mean)) / _stats(x, std)


def denormalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std + mean`` per channel or feature (no clamping to [0, 1])."""
    if not x.is_floating_point():
        return x
    return x * _stats(x, std) + _stats(x, mean)
