"""Per-channel normalization between pixel space [0, 1] and the models' input space."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _channel_stats(x: torch.Tensor, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``values`` as a (C, 1, 1) tensor on ``x``'s device and dtype; broadcasts over (C,H,W) and (N,C,H,W)."""
    return torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x - mean) / std`` per channel; ``x`` is (C, H, W) or (N, C, H, W) on any device. Differentiable."""
    return (x - _channel_stats(x, mean)) / _channel_stats(x, std)


def denormalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std + mean`` per channel (no clamping to [0, 1])."""
    return x * _channel_stats(x, std) + _channel_stats(x, mean)
