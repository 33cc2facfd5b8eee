"""Draw images from a prior and save them as one grid PNG (to eyeball what a prior has learned)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fedsim.errors import FedsimError
from fedsim.outputs import write_atomic
from fedsim.priors.generator import to_pixels
from fedsim.priors.store import Prior
from fedsim.seeding import torch_generator

SIGNATURE_KEY, SIGNATURE = "Software", "fedsim prior sample"  # PNG text chunk: the grid is fedsim's


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
    """Write ``n`` samples as a near-square grid PNG (written to a temporary file, then renamed). An existing
    file at ``path`` is replaced only when it is such a grid (FedsimError otherwise, before drawing)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from torchvision.utils import make_grid

    path = Path(path)
    check_sample_target(path)
    images = sample_images(prior, n, seed)
    grid = make_grid(images, nrow=math.ceil(math.sqrt(n)), padding=2, pad_value=1.0)
    array = (grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(SIGNATURE_KEY, SIGNATURE)
    return write_atomic(path, lambda fh: image.save(fh, format="PNG", pnginfo=info))


def check_sample_target(path: Path) -> None:
    """Refuse (FedsimError at ``--out``) to overwrite a file that is not a sample grid fedsim wrote (PNG text
    chunk :data:`SIGNATURE_KEY`); nothing is touched."""
    from PIL import Image

    if not path.exists() and not path.is_symlink():
        return
    try:
        with Image.open(path) as im:
            ours = im.format == "PNG" and im.info.get(SIGNATURE_KEY) == SIGNATURE
    except (OSError, ValueError):
        ours = False
    if not ours or not path.is_file() or path.is_symlink():
        raise FedsimError(f"--out: {path} exists and is not a sample grid fedsim wrote; fedsim does not overwrite "
                          "what it did not create: choose another path")
