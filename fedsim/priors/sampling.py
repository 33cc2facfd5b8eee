"""Draw images from a prior and save them as one grid PNG (to eyeball what a prior has learned)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fedsim.priors.generator import to_pixels
from fedsim.priors.store import Prior
from fedsim.seeding import torch_generator


@torch.no_grad()
def sample_images(prior: Prior, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` generator samples in pixel space [0, 1], (n, C, R, R); latents seeded by ``(seed, "prior-sample")``."""
    gen = prior.generator
    was_training = gen.training
    gen.eval()
    device = next(gen.parameters()).device
    z = gen.sample_latent(n, generator=torch_generator(seed, "prior-sample")).to(device)
    images = to_pixels(gen(z)).clamp(0, 1).cpu()
    gen.train(was_training)
    return images


def save_sample_grid(prior: Prior, path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` samples as a near-square grid PNG (written to a temporary file, then renamed)."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = sample_images(prior, n, seed)
    grid = make_grid(images, nrow=math.ceil(math.sqrt(n)), padding=2, pad_value=1.0)
    array = (grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
