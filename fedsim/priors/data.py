"""The auxiliary images a prior learns from: an index range of one split, resized to the prior's resolution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.errors import ScenarioError
from fedsim.priors.config import PriorConfig


@dataclass(frozen=True)
class AuxiliaryImages:
    """Pixels in [0, 1], (N, C, R, R), and a human note of where they came from."""

    images: torch.Tensor
    note: str

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])


def load_auxiliary_images(config: PriorConfig) -> AuxiliaryImages:
    """``config.data.split`` examples ``start .. stop-1`` of the dataset, resized (bilinear) when
    ``model.resolution`` differs from the dataset's image size (non-square images become square)."""
    from fedsim.data import load_dataset
    from fedsim.scenario import DataSpec

    spec = config.data
    bundle = load_dataset(DataSpec(dataset=spec.dataset, root=spec.root, download=spec.download,
                                   test_fraction=spec.test_fraction))
    x = bundle.train_x if spec.split == "train" else bundle.test_x
    n = int(x.shape[0])
    stop = n if spec.stop is None else spec.stop
    if spec.start >= n:
        raise ScenarioError("data.start", f"{spec.start} is past the {n} {spec.split} examples of {spec.dataset!r}")
    if stop > n:
        raise ScenarioError("data.stop", f"{stop} is past the {n} {spec.split} examples of {spec.dataset!r}")
    if stop - spec.start < config.training.batch_size:
        raise ScenarioError("training.batch_size", f"{config.training.batch_size} is more than the "
                                                   f"{stop - spec.start} images in data.start..data.stop")
    images = x[spec.start:stop].clone()
    height, width = images.shape[-2:]
    resolution = config.model.resolution or int(height)
    if resolution % 4 or resolution < 8:
        raise ScenarioError("model.resolution", f"the dataset's images are {height}x{width}: set a resolution "
                                                "that is a multiple of 4 and at least 8")
    if (height, width) != (resolution, resolution):
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0, 1)
    note = f"{spec.dataset} {spec.split} examples {spec.start}..{stop - 1} ({stop - spec.start} images)"
    return AuxiliaryImages(images.contiguous(), note)
