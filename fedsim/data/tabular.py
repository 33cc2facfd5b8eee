"""Tabular regression datasets from scikit-learn: ``diabetes`` and ``california-housing``.

* ``diabetes``: scikit-learn's bundled ``load_diabetes`` (Efron et al., 2004): 442 patients, 10
  features, target a disease-progression score. Shipped inside scikit-learn, so always offline. The
  raw (``scaled=False``) features are used and standardized here.
* ``california-housing``: ``fetch_california_housing`` (Pace and Barry, 1997): 20,640 districts, 8
  features, target the median house value. scikit-learn downloads it into ``data.root`` (default
  ``~/.fedsim/data``) when ``data.download`` is true; when it is not there and may not be downloaded,
  the loader raises one :class:`~fedsim.errors.DataUnavailableError` saying how to get it.

Preprocessing is that of DIFF2's authors (Murata & Suzuki, ICML 2023; their ``src/utils/load_dataset.py``
at lawrenceztang/CE-PLSGM@4b4d60a; spec ``algorithms-more.md`` §9.7), in this order:

1. ``y / max|y|`` with the maximum over the WHOLE dataset, before the split (as the authors' code does),
   so ``max|y| = 1`` over train and test together;
2. ``sklearn.model_selection.train_test_split(test_size=data.test_fraction, random_state=0)``; the
   default ``test_fraction`` 0.2 gives the authors' 80/20 split (diabetes: 353 train, 89 test);
3. ``StandardScaler`` fit on the train part only, applied to both parts (in float64, then float32).

The bundle holds the standardized features, float32 (N, d), with mean 0 and std 1 per feature
(normalization is then the identity), the scaled targets float32 (N,), ``task="regression"`` and
``num_classes=0`` (one model output). The train part keeps ``train_test_split``'s order, so
``data.train_subset`` takes the first N of that shuffled order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.data.bundle import DatasetBundle, num_test_examples
from fedsim.data.catalog import DATASETS, DatasetFacts, declare_facts
from fedsim.data.sources import Examples, declare_source
from fedsim.data.torchvision_sets import data_root
from fedsim.errors import DataUnavailableError

if TYPE_CHECKING:
    from fedsim.scenario import DataSpec

SPLIT_SEED = 0  # the authors' train_test_split(random_state=0)
_CAL_FILE = "cal_housing_py3.pkz"  # what fetch_california_housing keeps in its data_home


def split_indices(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test parts, in the order ``train_test_split`` returns them.

    The test part holds ``ceil(n * test_fraction)`` rows (scikit-learn's rule, also fedsim's
    :func:`~fedsim.data.bundle.num_test_examples`, which refuses a split that would leave a part empty).
    """
    from sklearn.model_selection import train_test_split

    num_test_examples(n, test_fraction)  # ScenarioError at data.dataset for a set too small to split
    train, test = train_test_split(np.arange(n), test_size=test_fraction, random_state=SPLIT_SEED)
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def regression_bundle(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
                      attribution: str) -> DatasetBundle:
    """Scale ``y`` by ``max|y|`` (all rows), split, standardize on the train part: the authors' recipe.

    ``x`` (N, d) and ``y`` (N,) are raw numbers in any float dtype. Raises ValueError on a constant
    zero target (nothing to scale by).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
    peak = float(np.abs(y).max())
    if not peak > 0:
        raise ValueError(f"{name}: every target is 0, so y / max|y| is undefined")
    y = y / peak
    from sklearn.preprocessing import StandardScaler

    train, test = split_indices(len(x), test_fraction)
    scaler = StandardScaler().fit(x[train])
    d = x.shape[1]

    def features(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(scaler.transform(x[rows]).astype(np.float32))

    def targets(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y[rows].astype(np.float32))

    return DatasetBundle(name=name, train_x=features(train), train_y=targets(train), test_x=features(test),
                         test_y=targets(test), num_classes=0, mean=(0.0,) * d, std=(1.0,) * d,
                         attribution=attribution, task="regression")


@dataclass(frozen=True)
class RandomSplit:
    """A :class:`~fedsim.data.sources.Source` for a pool of ``size`` rows split by :func:`split_indices`:
    train/test position ``p`` is row ``split_indices(...)[part][p]`` of the collection."""

    collection: str
    size: int

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        train, test = split_indices(self.size, spec.test_fraction)
        rows = (train if split == "train" else test)[start:stop]
        what = f"{dataset} {split} examples {start}..{'end' if stop is None else stop - 1}"
        return Examples(self.collection, "all", np.unique(rows).astype(np.int64), what)


def load_diabetes(spec: DataSpec) -> DatasetBundle:
    """scikit-learn's bundled diabetes data (442 x 10, raw features), preprocessed as the module says."""
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    x, y = sklearn_diabetes(return_X_y=True, scaled=False)
    return regression_bundle("diabetes", x, y, spec.test_fraction,
                             "Diabetes (Efron, Hastie, Johnstone and Tibshirani, 2004), via scikit-learn")


def load_california_housing(spec: DataSpec) -> DatasetBundle:
    """California Housing (20,640 x 8) from ``data.root``; downloaded there by scikit-learn when
    ``data.download`` is true. Raises DataUnavailableError (one line) when absent or the download fails."""
    from sklearn.datasets import fetch_california_housing

    root = data_root(spec)
    if not spec.download and not (root / _CAL_FILE).is_file():
        raise DataUnavailableError(_missing(root))  # before scikit-learn, which would create the folder
    try:
        with warnings.catch_warnings():  # scikit-learn warns "Retry downloading" per attempt: one line is ours
            warnings.filterwarnings("ignore", message=".*[Rr]etry download", category=UserWarning)
            x, y = fetch_california_housing(data_home=str(root), download_if_missing=spec.download, return_X_y=True)
    except (OSError, RuntimeError, ValueError, EOFError) as err:  # URLError/HTTPError are OSErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if spec.download:
            raise DataUnavailableError(
                f"dataset 'california-housing': downloading it into {root} failed ({first}). Without network, "
                f"copy {_CAL_FILE} from a scikit-learn data folder (~/scikit_learn_data) of a machine that has "
                "it into that folder and keep data.download: false, or use dataset: diabetes (offline)"
            ) from None
        raise DataUnavailableError(f"{_missing(root)} ({first})") from None
    return regression_bundle("california-housing", x, y, spec.test_fraction,
                             "California Housing (Pace and Barry, 1997), via scikit-learn")


def _missing(root: Path) -> str:
    return (f"dataset 'california-housing' not found in {root} (scikit-learn's {_CAL_FILE}): set "
            "data.download: true (needs network) to let scikit-learn fetch it there, or copy that file from a "
            "scikit-learn data folder (~/scikit_learn_data) into it; set data.root to use another folder, or use "
            "dataset: diabetes (offline)")


def _register(name: str, loader: Callable[[DataSpec], DatasetBundle], collection: str, rows: int,
              features: int) -> None:
    DATASETS.add(name, loader)
    declare_facts(name, DatasetFacts(task="regression", inputs="tabular", features=features))
    declare_source(name, RandomSplit(collection, rows))


_register("diabetes", load_diabetes, "Diabetes", 442, 10)
_register("california-housing", load_california_housing, "California-Housing", 20640, 8)
