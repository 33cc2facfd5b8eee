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


ASSETS: dict[str, _Asset] = {
    "digits": _Asset("digits.npz", 10, DIGITS_STATS),
    "mnist-5k": _Asset("mnist-5k.npz", 10, MNIST_STATS),
    "mnist-mini": _Asset("mnist-mini.npz", 10, MNIST_STATS),
    "fashion-mnist-mini": _Asset("fashion-mnist-mini.npz", 10, FASHION_MNIST_STATS),
    "cifar10-mini": _Asset("cifar10-mini.npz", 10, CIFAR10_STATS),
    "cifar100-mini": _Asset("cifar100-mini.npz", 100, CIFAR100_STATS),
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


def _register(name: str) -> None:
    DATASETS.add(name, lambda spec: load_bundled(name, spec))


for _name in ASSETS:
    _register(_name)
