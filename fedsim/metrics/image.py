"""Per-pair image metrics for batches in pixel space [0, 1], shape (B, C, H, W).

Every function scores ``x[i]`` against ``y[i]`` and returns a float tensor of shape (B,). Inputs are
sanitised first (:func:`to_unit_range`): non-finite pixels become 0 and values are clamped to [0, 1],
so a diverged reconstruction is scored as the image it would display, never as NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PSNR_CAP_DB = 100.0
"""PSNR reported for (near-)identical images instead of +inf (MSE <= 1e-10 at data range 1)."""


def to_unit_range(x: Tensor) -> Tensor:
    """Detached float32 CPU copy with NaN/±inf mapped to 0/1/0 and values clamped to [0, 1]."""
    x = x.detach().to("cpu", torch.float32)
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 4 or x.shape != y.shape:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {shapes}")
    return to_unit_range(x), to_unit_range(y)


def mse_per_image(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image over C×H×W, on [0, 1] pixels."""
    x, y = _pair(x, y)
    return (x - y).pow(2).flatten(1).mean(1)


def psnr_per_image(x: Tensor, y: Tensor, cap: float = PSNR_CAP_DB) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10·log10(1 / MSE)`` dB (data range 1).

    Identical images would give +inf; the value is capped at ``cap`` (100 dB, i.e. MSE 1e-10) so that
    means and JSON reports stay finite. Computed in float64 to keep small MSEs exact.
    """
    mse = mse_per_image(x, y).double()
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-cap / 10.0)))
    return psnr.clamp_max(cap).float()


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Gaussian window (kernel size, sigma) used by :func:`ssim_per_image` for an H×W image.

    Wang et al. (2004) use an 11×11 Gaussian with sigma 1.5. Small images get a proportionally
    smaller window, ``k = min(11, largest odd <= min(H, W) // 2 + 1)`` and ``sigma = 1.5·k / 11``
    (torchmetrics derives the kernel size from sigma, and this sigma gives back exactly ``k``):
    8×8 digits use k=5 (sigma≈0.68), 16×16 uses 9, and 20 px and up (MNIST, CIFAR) the standard 11.
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3×3 pixels, got {height}×{width}")
    k = min(11, side // 2 + 1)
    k = max(3, k if k % 2 == 1 else k - 1)
    sigma = 1.5 * k / 11.0
    assert int(3.5 * sigma + 0.5) * 2 + 1 == k  # torchmetrics' Gaussian size for this sigma
    return k, sigma


def ssim_per_image(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity per image (Wang et al. 2004), averaged over channels and pixels.

    Uses ``torchmetrics.functional.structural_similarity_index_measure`` (data range 1, k1=0.01,
    k2=0.03, reflect padding, no border crop) with the window from :func:`ssim_window`.
    """
    # imported here: torchmetrics pulls torchvision, scipy and matplotlib (seconds) into every importer
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _pair(x, y)
    k, sigma = ssim_window(x.shape[-2], x.shape[-1])
    out = structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=sigma, kernel_size=k, reduction="none", data_range=1.0
    )
    return out.reshape(x.shape[0]).float()


def psnr_from_mse(mse: float, cap: float = PSNR_CAP_DB) -> float:
    """The PSNR (dB, data range 1) of a given MSE, capped like :func:`psnr_per_image`."""
    return cap if mse <= 10.0 ** (-cap / 10.0) else min(cap, 10.0 * math.log10(1.0 / mse))
