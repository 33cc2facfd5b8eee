"""Client-side data augmentation (``federation.local.augmentation``): the usual CIFAR recipe.

``flip_crop``: each example of each local step is, independently, (1) mirrored left-right with
probability 1/2, only on datasets whose classes survive a mirror (:data:`MIRROR_INVARIANT`: natural
images and clothing; never digits or letters, where a mirrored 2, 3 or 7 is no digit), and (2) zero-padded
by ``pad = max(1, H // 8)`` pixels on each side (4 for 32x32 CIFAR, 3 for 28x28 MNIST, 1 for 8x8
digits) and cropped back to H x W at a uniformly random offset (Krizhevsky et al. 2012; He et al. 2016's
CIFAR recipe: 4-pixel padding, random 32x32 crop, random horizontal flip). Padding is black (0 in pixel
space [0, 1], before normalization), as torchvision's ``RandomCrop(padding=...)`` pads a PIL image.

Every draw comes from the generator ``(seed, "augment", round, partition id, step)``, so the same client
in the same round augments the same way on any backend. The augmented batch is what the gradient is
computed on; the evaluator keeps scoring reconstructions against the client's un-augmented images (the
private data), which :func:`scoring_note` states in each run's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.seeding import torch_generator

#: Datasets whose images keep their class when mirrored left-right (flip allowed). Everything else
#: (digits, MNIST, user image folders of unknown content) gets the random crop only.
MIRROR_INVARIANT = frozenset({"cifar10", "cifar10-mini", "cifar100", "cifar100-mini",
                              "fashion-mnist", "fashion-mnist-mini"})


@dataclass(frozen=True)
class Augmentation:
    """One scenario's augmentation: ``flip`` (mirror allowed on this dataset) and crop ``pad`` (pixels)."""

    flip: bool
    pad: int

    def apply(self, x: Tensor, *, seed: int, round_num: int, partition_id: int, step: int) -> Tensor:
        """The augmented copy of ``x`` (N, C, H, W) in pixel space; ``x`` itself is not changed.

        Per example: a flip coin (when ``flip``) then a crop offset ``(dy, dx)`` in ``[0, 2 pad]^2`` of the
        zero-padded image, drawn in that order from the ``(seed, "augment", round_num, partition_id, step)``
        generator. An empty batch comes back as it is.
        """
        n = len(x)
        if n == 0:
            return x.clone()
        gen = torch_generator(seed, "augment", round_num, partition_id, step)
        flips = torch.rand(n, generator=gen) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        out = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        padded = torch.nn.functional.pad(out, (self.pad,) * 4)
        h, w = x.shape[-2:]
        return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def augmentation_for(kind: str, dataset: str, input_shape: tuple[int, ...]) -> Augmentation | None:
    """The :class:`Augmentation` of ``federation.local.augmentation`` ``kind`` on ``dataset`` whose inputs are
    ``input_shape`` (C, H, W); None for ``none``. Raises ``ValueError`` on inputs that are not images."""
    if kind == "none":
        return None
    if kind != "flip_crop":
        raise ValueError(f"unknown augmentation {kind!r} (none or flip_crop)")
    if len(input_shape) != 3:
        raise ValueError(f"flip_crop needs images (C, H, W); {dataset!r} has inputs of shape {tuple(input_shape)}")
    return Augmentation(flip=dataset in MIRROR_INVARIANT, pad=max(1, int(input_shape[-2]) // 8))


def describe(kind: str, dataset: str) -> str:
    """One line for reports: what the clients' augmentation does on ``dataset``."""
    if kind == "none":
        return "none"
    flip = "random horizontal flip, " if dataset in MIRROR_INVARIANT else "no flip (mirrored classes change), "
    return f"{kind}: {flip}random crop of the zero-padded image (pad = max(1, H // 8))"


def scoring_note(kind: str) -> str | None:
    """What the leakage numbers are scored against when the clients augment (None without augmentation)."""
    if kind == "none":
        return None
    return (f"clients train on augmented batches ({kind}); reconstructions are scored against the client's "
            "un-augmented images, the private data")
