"""The dataset registry. Its entries are loaders ``(DataSpec) -> DatasetBundle``.

A new dataset is a function decorated with ``@DATASETS.register("name")`` in a module of this
package (imported by ``fedsim/data/__init__.py``) or in any module imported before the run.

A dataset that is not an image classification task declares so with :func:`declare_facts` (next to
its registration): validation reads these facts to refuse what cannot run on the task (a class
partition of a regression, an image model on feature vectors) without loading the data, which may
not be on disk yet. :func:`fedsim.data.load_dataset` checks that a loaded bundle matches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fedsim.data.bundle import TaskKind
from fedsim.registry import Registry

if TYPE_CHECKING:
    from fedsim.data.bundle import DatasetBundle
    from fedsim.scenario import DataSpec

DatasetLoader = Callable[["DataSpec"], "DatasetBundle"]

DATASETS: Registry[DatasetLoader] = Registry("dataset")

InputKind = Literal["image", "tabular", "tokens"]


@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset is, known without loading it: the task and the kind of inputs.

    ``inputs``: ``image`` ((C, H, W) pixels), ``tabular`` ((d,) standardized features, ``features`` = d) or
    ``tokens`` ((T,) token ids of a text dataset; ``seq_len`` = the default T, ``data.seq_len`` overrides it).
    """

    task: TaskKind = "classification"
    inputs: InputKind = "image"
    features: int | None = None
    seq_len: int | None = None  # tokens: the default sequence length


FACTS: dict[str, DatasetFacts] = {}


def declare_facts(dataset: str, facts: DatasetFacts) -> None:
    """Declare what ``dataset`` is (every dataset not declared is an image classification task)."""
    FACTS[dataset] = facts


def facts_of(dataset: str) -> DatasetFacts:
    """The declared facts of ``dataset``, or those of an image classification task."""
    return FACTS.get(dataset, DatasetFacts())
