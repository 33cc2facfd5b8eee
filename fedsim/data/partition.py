"""Split the training set among clients: iid, Dirichlet label skew, pathological shards, or whole sources.

Dirichlet and shards use flwr-datasets' partitioners (the reference implementations the FL
literature compares against) on an in-memory ``datasets.Dataset`` holding only the labels, so they
work offline. ``by_source`` (text datasets: each client holds whole books) is fedsim's own, in numpy; its
``labels`` argument is then the examples' source ids (``DatasetBundle.groups``), not their classes. The same
(labels, num_partitions, spec, seed) always gives the same partitions.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from fedsim.errors import ScenarioError
from fedsim.scenario import PartitionSpec
from fedsim.seeding import derive_seed


def partition_indices(
    labels: np.ndarray | torch.Tensor, num_partitions: int, spec: PartitionSpec, seed: int
) -> list[np.ndarray]:
    """One sorted int64 array of train-set indices per client (``num_partitions`` of them).

    ``iid`` and ``dirichlet`` cover every index exactly once and give every client at least one
    example. ``by_source`` (``labels`` = source ids) covers every index exactly once, each source whole on one
    client, and refuses more clients than sources. ``shards`` gives each client ``spec.shards_per_client``
    classes (the first one assigned round-robin, so every class is used when there are at least as many clients
    as classes); with fewer clients than classes some classes are left out, as in flwr-datasets.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64).ravel()
    n = len(y)
    if num_partitions < 1:
        raise ScenarioError("federation.clients", "there must be at least one client")
    if num_partitions > n:
        raise ScenarioError(
            "federation.clients",
            f"{num_partitions} clients but only {n} training examples: every client needs at least one "
            "(lower federation.clients or use more data)",
        )
    part_seed = derive_seed(seed, "partition", spec.kind)
    if spec.kind == "iid":
        parts = _iid(n, num_partitions, part_seed)
    elif spec.kind == "dirichlet":
        parts = _dirichlet(y, num_partitions, spec.alpha, part_seed)
    elif spec.kind == "shards":
        parts = _shards(y, num_partitions, spec.shards_per_client, part_seed)
    elif spec.kind == "by_source":
        parts = _by_source(y, num_partitions, part_seed)
    else:  # pragma: no cover - PartitionSpec.kind is a Literal
        raise ScenarioError("data.partition.kind", f"unknown partition kind {spec.kind!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(n: int, k: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation cut into ``k`` contiguous, near-equal shards.

    flwr-datasets' IidPartitioner is exactly ``Dataset.shard(k, i, contiguous=True)`` (the sizes of
    ``np.array_split``) with no seed of its own, and reading 1,000 shards back through
    ``datasets`` costs about 2 s; the same split in numpy on a seeded permutation is equivalent,
    deterministic and hundreds of times faster.
    """
    perm = np.random.default_rng(seed).permutation(n)
    return np.array_split(perm, k)


def _by_source(sources: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Whole sources per client: the distinct source ids in a seeded random order, dealt round-robin (client
    ``i`` gets the sources at positions i, i + k, i + 2k, ...), so client sizes follow the sources' sizes.

    Raises ScenarioError at ``federation.clients`` when there are more clients than sources.
    """
    distinct = np.unique(sources)
    if k > len(distinct):
        raise ScenarioError("federation.clients", f"{k} clients but the training set has only {len(distinct)} "
                            "sources to deal out whole (data.partition.kind: by_source): use at most "
                            f"{len(distinct)} clients or kind: iid")
    order = np.random.default_rng(seed).permutation(distinct)
    return [np.flatnonzero(np.isin(sources, order[i::k])) for i in range(k)]


def _label_dataset(y: np.ndarray) -> Any:
    """An in-memory HF dataset of (label, idx): no download, no cache files, no progress bars."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict({"label": y, "idx": np.arange(len(y), dtype=np.int64)})


def _assignments(partitioner: Any, k: int) -> list[np.ndarray]:
    """Row indices of each partition. Reading them one ``load_partition`` at a time costs ~2-5 ms
    per partition (seconds for 1,000 clients), so the partitioner's computed map is read directly,
    with the public API as the fallback should that attribute change."""
    with warnings.catch_warnings():  # retries and dropped-class notices; fedsim checks the result itself
        warnings.simplefilter("ignore")
        _ = partitioner.num_partitions  # public property; triggers the seeded assignment
        mapping = getattr(partitioner, "_partition_id_to_indices", None)
        if isinstance(mapping, dict) and sorted(mapping) == list(range(k)):
            return [np.asarray(mapping[i], dtype=np.int64) for i in range(k)]
        return [np.asarray(partitioner.load_partition(i).with_format("numpy")["idx"], dtype=np.int64)
                for i in range(k)]


def _dirichlet(y: np.ndarray, k: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) proportions over clients (Hsu et al., 2019), via flwr-datasets.

    First asks for every client to get at least one example (flwr-datasets resamples up to 10
    times). On tiny data or many clients that can fail, so the fallback takes one unconstrained
    draw and moves one example from the largest client to each empty one (deterministic).
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    def assign(min_size: int) -> list[np.ndarray]:
        p = DirichletPartitioner(num_partitions=k, partition_by="label", alpha=float(alpha),
                                 min_partition_size=min_size, seed=seed)
        p.dataset = _label_dataset(y)
        return _assignments(p, k)

    try:
        parts = assign(1)
    except ValueError:  # "The max number of attempts (10) was reached"
        parts = assign(0)
    return _fill_empty(parts)


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty partition the largest index of the currently largest partition."""
    parts = [np.sort(p) for p in parts]
    for i in range(len(parts)):
        if len(parts[i]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _shards(y: np.ndarray, k: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-iid split (McMahan et al., 2017): ``per_client`` classes per client."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    num_classes = len(np.unique(y))
    if per_client > num_classes:
        raise ScenarioError(
            "data.partition.shards_per_client",
            f"{per_client} classes per client, but the training set has only {num_classes} classes",
        )
    p = PathologicalPartitioner(num_partitions=k, partition_by="label", num_classes_per_partition=per_client,
                                class_assignment_mode="first-deterministic", seed=seed)
    p.dataset = _label_dataset(y)
    try:
        return _assignments(p, k)
    except ValueError:
        raise ScenarioError(
            "data.partition",
            f"cannot give {k} clients {per_client} classes each: some class would be shared by more "
            "clients than it has examples (lower federation.clients or data.partition.shards_per_client, "
            "or use more data)",
        ) from None
