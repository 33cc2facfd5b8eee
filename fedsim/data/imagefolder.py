"""``imagefolder``: the user's own images in torchvision's ImageFolder layout.

``data.root`` must contain ``train/<class>/<image>`` and optionally ``test/<class>/<image>``; class
indices are the sorted class folder names of ``train/``. All images must have the same size (nothing
is resized). They are kept grayscale (1 channel) when every image has a single band, else converted
to RGB. Examples are ordered class-interleaved (1st image of each class, then the 2nd, ...; files
sorted by name), so without ``test/`` the "last fraction is test" rule of
:func:`fedsim.data.bundle.tail_split` gives a (near-)stratified test set. Mean/std are computed
from the training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsim.data.bundle import DatasetBundle, class_interleaved, tail_split, to_unit_float
from fedsim.data.catalog import DATASETS
from fedsim.data.torchvision_sets import data_root
from fedsim.errors import DataUnavailableError, ScenarioError
from fedsim.scenario import DataSpec


def _samples(
    folder: Path, class_to_idx: dict[str, int] | None
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, class) pairs under ``folder`` (class-interleaved) and the class mapping used."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        if class_to_idx is None:
            _, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except (FileNotFoundError, OSError) as err:
        raise DataUnavailableError(f"dataset 'imagefolder': cannot read {folder}: {err}") from None
    if not samples:
        raise DataUnavailableError(
            f"dataset 'imagefolder': no images found in {folder} (expected {folder}/<class>/<image>.png)"
        )
    order = class_interleaved(np.array([c for _, c in samples]))
    return [samples[i] for i in order], class_to_idx


def _read(samples: list[tuple[str, int]], gray: bool | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode images into a uint8 (N, C, H, W) array; ``gray=None`` decides from the images."""
    from PIL import Image

    images = []
    for path, _ in samples:
        with Image.open(path) as im:
            im.load()
            images.append((path, im.copy()))
    if gray is None:
        gray = all(len(im.getbands()) == 1 for _, im in images)
    arrays, first = [], None
    for path, im in images:
        a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
        if first is None:
            first = (path, a.shape)
        elif a.shape != first[1]:
            raise ScenarioError(
                "data.root",
                f"imagefolder images must all have the same size: {first[0]} is {first[1][1]}x{first[1][0]} "
                f"but {path} is {a.shape[1]}x{a.shape[0]} (resize them first)",
            )
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    return np.stack(arrays), np.array([c for _, c in samples], dtype=np.int64), gray


@DATASETS.register("imagefolder")
def load_imagefolder(spec: DataSpec) -> DatasetBundle:
    """Load ``<root>/train`` (and ``<root>/test`` if present) into a bundle."""
    if spec.root is None:
        raise ScenarioError("data.root", "dataset 'imagefolder' needs data.root (a folder holding train/)")
    root = data_root(spec)
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DataUnavailableError(
            f"dataset 'imagefolder': {train_dir} does not exist; put your images in "
            f"{train_dir}/<class name>/<image> (and optionally {test_dir}/<class name>/<image>)"
        )
    train_samples, class_to_idx = _samples(train_dir, None)
    x, y, gray = _read(train_samples, None)
    if test_dir.is_dir():
        test_x_u8, test_y_np, _ = _read(_samples(test_dir, class_to_idx)[0], gray)
        if test_x_u8.shape[1:] != x.shape[1:]:
            raise ScenarioError("data.root", f"images in {test_dir} differ in size from those in {train_dir}")
        train_x, train_y = to_unit_float(x), torch.from_numpy(y)
        test_x, test_y = to_unit_float(test_x_u8), torch.from_numpy(test_y_np)
    else:
        split = tail_split(to_unit_float(x), torch.from_numpy(y), spec.test_fraction)
        train_x, train_y, test_x, test_y = split
    dims = (0, 2, 3)
    mean = tuple(round(float(v), 4) for v in train_x.mean(dim=dims))
    std = tuple(max(round(float(v), 4), 1e-3) for v in train_x.std(dim=dims))
    return DatasetBundle(
        name="imagefolder",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(class_to_idx),
        mean=mean,
        std=std,
        attribution=f"user-supplied images from {root}",
    )
