"""Datasets and client partitions.

:func:`load_dataset` turns a :class:`~fedsim.scenario.DataSpec` into a :class:`DatasetBundle`
(float32 pixels in [0, 1], (N, C, H, W), or standardized features (N, d) for tabular data);
:func:`partition_indices` splits its training set among clients. Datasets come from the
:data:`DATASETS` registry: six small image sets bundled in the package (``digits``, ``mnist-5k``,
``mnist-mini``, ``fashion-mnist-mini``, ``cifar10-mini``, ``cifar100-mini``; always offline), the full
torchvision ones (``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``), ``imagefolder`` for your own
images, and two tabular regression tasks from scikit-learn (``diabetes``, offline;
``california-housing``, downloaded), and text as token ids (N, T) (:mod:`fedsim.data.text`: ``kjv``, ``kjv-genre``
bundled; ``wikitext-2`` downloaded). :func:`facts_of` tells a dataset's task and input kind without
loading it.
"""

from __future__ import annotations

from fedsim.data import bundled, imagefolder, tabular, text, torchvision_sets, wikitext  # noqa: F401  (registers)
from fedsim.data.bundle import TASK_KINDS, DatasetBundle, TaskKind
from fedsim.data.catalog import DATASETS, DatasetFacts, DatasetLoader, facts_of
from fedsim.data.partition import partition_indices
from fedsim.data.transforms import denormalize, normalize
from fedsim.errors import ScenarioError
from fedsim.scenario import DataSpec

__all__ = [
    "DATASETS",
    "TASK_KINDS",
    "DatasetBundle",
    "DatasetFacts",
    "DatasetLoader",
    "TaskKind",
    "denormalize",
    "facts_of",
    "load_dataset",
    "normalize",
    "partition_indices",
]


def load_dataset(spec: DataSpec) -> DatasetBundle:
    """Load ``spec.dataset`` from the registry and keep only its first ``spec.train_subset`` train examples.

    Each call returns fresh tensors (bundled files are read from disk once per process and cached).
    Raises :class:`~fedsim.errors.RegistryError` for an unknown name and
    :class:`~fedsim.errors.DataUnavailableError` when the data is not on disk.
    """
    bundle = DATASETS.get(spec.dataset)(spec)
    facts = facts_of(spec.dataset)
    inputs = "tokens" if bundle.is_text else "tabular" if len(bundle.input_shape) == 1 else "image"
    if bundle.task != facts.task or inputs != facts.inputs:
        raise ValueError(f"dataset {spec.dataset!r} loaded a {bundle.task} task on {bundle.input_shape} inputs, "
                         f"but declares {facts} (fedsim.data.catalog.declare_facts)")
    if spec.train_subset is not None:
        if spec.train_subset > bundle.num_train:
            raise ScenarioError(
                "data.train_subset",
                f"{spec.train_subset} is more than the {bundle.num_train} training examples "
                f"of {spec.dataset!r}",
            )
        bundle = bundle.with_train_subset(spec.train_subset)
    return bundle
