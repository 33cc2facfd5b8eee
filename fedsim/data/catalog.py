"""The dataset registry. Its entries are loaders ``(DataSpec) -> DatasetBundle``.

A new dataset is a function decorated with ``@DATASETS.register("name")`` in a module of this
package (imported by ``fedsim/data/__init__.py``) or in any module imported before the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedsim.registry import Registry

if TYPE_CHECKING:
    from fedsim.data.bundle import DatasetBundle
    from fedsim.scenario import DataSpec

DatasetLoader = Callable[["DataSpec"], "DatasetBundle"]

DATASETS: Registry[DatasetLoader] = Registry("dataset")
