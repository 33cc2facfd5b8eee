"""``imagefolder``: the user's own images in torchvision's ImageFolder layout.

``data.root`` must contain ``train/<class>/<image>`` and optionally ``test/<class>/<image>``; class
indices are the sorted class folder names of ``train/``. All images must have the same size (nothing
is resized). Every image is decoded by :func:`fedsim.data.images.decode_image` (each PIL mode and bit
depth converted to [0, 1] on purpose -- palette images keep their colours, 16-bit images their range --
or refused naming the file: transparent pixels, 32-bit integer or float pixels, animations). The
dataset is grey (1 channel) when every train image is grey, else RGB (grey images repeated; a colour
test image for a grey train set is refused). Examples are ordered class-interleaved (1st image of
each class, then the 2nd, ...; files sorted by name), so without ``test/`` the "last fraction is test" rule of
:func:`fedsim.data.bundle.tail_split` gives a (near-)stratified test set. Mean/std are computed
from the training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.data.bundle import DatasetBundle, class_interleaved, tail_split
from fedsim.data.catalog import DATASETS
from fedsim.data.images import decode_image, to_channels
from fedsim.data.sources import Examples, NativeSplits, Pool, declare_source
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
    skipped = _skipped_images(folder, class_to_idx, IMG_EXTENSIONS)
    if skipped is not None:
        raise ScenarioError("data.root", f"{skipped} is an image of a kind the folder scan skips (it reads "
                            f"{', '.join(IMG_EXTENSIONS)}): convert it, or move it out of the class folder")
    if not samples:
        raise DataUnavailableError(
            f"dataset 'imagefolder': no images found in {folder} (expected {folder}/<class>/<image>.png)"
        )
    order = class_interleaved(np.array([c for _, c in samples]))
    return [samples[i] for i in order], class_to_idx


def _skipped_images(folder: Path, class_to_idx: dict[str, int], read: tuple[str, ...]) -> Path | None:
    """The first file in a class folder that Pillow would open as an image (e.g. a .gif) but the torchvision
    scan skips for its extension: dropping it silently would train on fewer examples than the user gave."""
    from PIL import Image

    images = {ext.lower() for ext in Image.registered_extensions()} - {ext.lower() for ext in read}
    for name in sorted(class_to_idx):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in images:
                return path
    return None


def _read(samples: list[tuple[str, int]], channels: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode images into float32 pixels (N, C, H, W) in [0, 1] (:func:`fedsim.data.images.decode_image`);
    ``channels=None`` decides from the images: 1 when every image is grey, else 3."""
    from PIL import Image

    decoded = []
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                decoded.append((path, decode_image(im, path)))
        except (OSError, Image.DecompressionBombError) as err:
            raise ScenarioError("data.root", f"{path}: cannot be read as an image ({err})") from None
    if channels is None:
        channels = 1 if all(a.shape[0] == 1 for _, a in decoded) else 3
    arrays, first = [], None
    for path, a in decoded:
        a = to_channels(a, channels, path)
        if first is None:
            first = (path, a.shape)
        elif a.shape != first[1]:
            raise ScenarioError(
                "data.root",
                f"imagefolder images must all have the same size: {first[0]} is {first[1][2]}x{first[1][1]} "
                f"but {path} is {a.shape[2]}x{a.shape[1]} (resize them first)",
            )
        arrays.append(a)
    return np.stack(arrays), np.array([c for _, c in samples], dtype=np.int64), channels


@dataclass(frozen=True)
class _FolderSource:
    """An image folder is its own collection (named by its resolved root): with ``test/`` its splits are the
    folder's own, otherwise ``train/`` is one pool split by the tail rule (positions in the loader's order)."""

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        root = data_root(spec).resolve() if spec.root is not None else None
        collection = f"imagefolder:{root}"
        if root is not None and (root / "test").is_dir():
            return NativeSplits(collection).examples(dataset, split, start, stop, spec)
        try:
            count = len(_samples(root / "train", None)[0]) if root is not None else None
        except DataUnavailableError:
            count = None
        unknown = "" if count is not None else f"the images of {root}/train cannot be listed"
        return Pool(collection, "train", lambda _: count or 0, unknown=unknown).examples(dataset, split, start,
                                                                                         stop, spec)


declare_source("imagefolder", _FolderSource())


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
    x, y, channels = _read(train_samples, None)
    if test_dir.is_dir():
        test_x_np, test_y_np, _ = _read(_samples(test_dir, class_to_idx)[0], channels)
        if test_x_np.shape[1:] != x.shape[1:]:
            raise ScenarioError("data.root", f"images in {test_dir} differ in size from those in {train_dir}")
        train_x, train_y = torch.from_numpy(x), torch.from_numpy(y)
        test_x, test_y = torch.from_numpy(test_x_np), torch.from_numpy(test_y_np)
    else:
        split = tail_split(torch.from_numpy(x), torch.from_numpy(y), spec.test_fraction)
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
