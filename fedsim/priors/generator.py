"""A DCGAN-style generator and discriminator (Radford, Metz, Chintala, ICLR 2016), small enough to
train on a CPU from fedsim's bundled data.

The generator is a list of blocks so that feature-domain attacks can run any block range:
GIFD (Fang et al., ICCV 2023) optimises the *input* of block k and IF-GMI (Qiu et al., ECCV 2024)
does the same for model inversion, both via :meth:`DCGANGenerator.forward_blocks`.

Blocks, for ``resolution = 4 s`` (28 -> s = 7, 32 -> s = 8, 64 -> s = 16) and ``width = w``::

    0: Linear(latent -> 2w*s*s) -> BatchNorm1d -> ReLU -> reshape (2w, s, s)
    1: ConvTranspose(2w -> w, 4, stride 2) -> BatchNorm2d -> ReLU         (w, 2s, 2s)
    2: ConvTranspose(w -> w/2, 4, stride 2) -> BatchNorm2d -> ReLU        (w/2, 4s, 4s)
    3: Conv(w/2 -> channels, 3) -> Tanh                                   (channels, 4s, 4s) in [-1, 1]

Pixels are ``(output + 1) / 2`` (see :func:`to_pixels`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], *self.shape)


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) -> image (B, channels, resolution, resolution) in [-1, 1], in four blocks."""

    def __init__(self, latent_dim: int = 64, channels: int = 1, resolution: int = 28, width: int = 32) -> None:
        super().__init__()
        if resolution % 4 or resolution < 8:
            raise ValueError(f"resolution must be a multiple of 4 and at least 8, got {resolution}")
        if width % 2:
            raise ValueError(f"width must be even, got {width}")
        self.latent_dim, self.channels, self.resolution, self.width = latent_dim, channels, resolution, width
        s, w = resolution // 4, width
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(latent_dim, 2 * w * s * s), _Reshape(2 * w * s * s),
                          nn.BatchNorm1d(2 * w * s * s), nn.ReLU(), _Reshape(2 * w, s, s)),
            nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()),
            nn.Sequential(nn.ConvTranspose2d(w, w // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w // 2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(w // 2, channels, 3, 1, 1), nn.Tanh()),
        ])

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_input_shape(self, k: int) -> tuple[int, ...]:
        """Shape (without batch) of block k's input: the latent for k = 0, a feature map otherwise."""
        if not 0 <= k < self.num_blocks:
            raise IndexError(f"block {k} is outside 0..{self.num_blocks - 1}")
        s, w = self.resolution // 4, self.width
        return [(self.latent_dim,), (2 * w, s, s), (w, 2 * s, 2 * s), (w // 2, 4 * s, 4 * s)][k]

    def forward_blocks(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run blocks ``start .. end-1`` on ``x`` (block ``start``'s input); ``end`` defaults to the last block."""
        end = self.num_blocks if end is None else end
        if not 0 <= start <= end <= self.num_blocks:
            raise IndexError(f"block range {start}..{end} is outside 0..{self.num_blocks}")
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def forward(self, z: Tensor) -> Tensor:
        return self.forward_blocks(z, 0, self.num_blocks)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)


class DCGANDiscriminator(nn.Module):
    """image in [-1, 1] -> one realness logit per image (no sigmoid; train with BCE-with-logits)."""

    def __init__(self, channels: int = 1, resolution: int = 28, width: int = 32) -> None:
        super().__init__()
        s, w = resolution // 4, width
        self.net = nn.Sequential(
            nn.Conv2d(channels, w // 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w // 2, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(w * s * s, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def to_pixels(x: Tensor) -> Tensor:
    """Generator output in [-1, 1] -> pixel space [0, 1]."""
    return (x + 1) / 2


def from_pixels(x: Tensor) -> Tensor:
    """Pixel space [0, 1] -> the generator's [-1, 1] range (to train the discriminator on real data)."""
    return x * 2 - 1
