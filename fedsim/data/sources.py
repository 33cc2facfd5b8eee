"""Where each dataset's examples come from, so that two sets of examples can be compared by SOURCE.

Dataset names say little: ``mnist``, ``mnist-5k`` and ``mnist-mini`` all hold MNIST images, and a
prior trained on one may have seen what the clients of another hold. Every registered dataset
therefore declares its source (:func:`declare_source`): the underlying collection (``MNIST``), the
split of that collection, and how the dataset's example positions map onto the collection's indices.
:func:`examples_of` turns "split ``train``, examples ``a..b-1`` of dataset D" into collection indices,
and :func:`overlap` compares two such sets, answering in the unsafe direction: when a mapping is not
known (an undeclared dataset, a prior that records no range), overlap is assumed possible and the
reason is returned for the message.

Declared layouts:

* :class:`NativeSplits`: the dataset's train/test splits are the collection's (torchvision sets).
* :class:`Pool`: one pool of examples, split by fedsim's tail rule
  (:func:`fedsim.data.bundle.tail_split`), each pool position mapped to a collection index by
  identity, by a shipped table (``mnist-5k``), or not at all (unknown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedsim.data.bundle import num_test_examples

if TYPE_CHECKING:
    from fedsim.scenario import DataSpec

Indices = tuple[int, int | None] | np.ndarray  # a half-open range (stop None: to the end) or sorted indices


@dataclass(frozen=True)
class Examples:
    """A set of examples of one collection: ``indices`` of its ``split`` (None where not known)."""

    collection: str
    split: str | None  # None: which split of the collection is not known
    indices: Indices | None = field(compare=False)  # None: which indices is not known
    what: str = ""  # how a person would name it: "mnist-5k train examples 2000..3999"
    unknown: str = ""  # why split or indices are not known (for messages)


class Source(Protocol):
    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples: ...


def _what(dataset: str, split: str, start: int, stop: int | None) -> str:
    return f"{dataset} {split} examples {start}..{'end' if stop is None else stop - 1}"


@dataclass(frozen=True)
class NativeSplits:
    """The dataset's train and test splits are the collection's own, index for index."""

    collection: str

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        return Examples(self.collection, split, (start, stop), _what(dataset, split, start, stop))


@dataclass(frozen=True)
class Pool:
    """One pool of examples split by the tail rule; pool position ``p`` is collection index ``index()[p]``
    (``index=None``: ``p`` itself) of split ``pool_split``; ``unknown`` (a reason) when the map is not known."""

    collection: str | Callable[[DataSpec], str]
    pool_split: str | None
    size: Callable[[DataSpec], int]
    index: Callable[[], np.ndarray] | None = None
    unknown: str = ""

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        collection = self.collection(spec) if callable(self.collection) else self.collection
        what = _what(dataset, split, start, stop)
        if self.unknown:
            return Examples(collection, self.pool_split, None, what, self.unknown)
        n = self.size(spec)
        n_test = num_test_examples(n, spec.test_fraction)
        base, length = (0, n - n_test) if split == "train" else (n - n_test, n_test)
        lo, hi = base + min(start, length), base + min(length if stop is None else stop, length)
        if self.index is None:
            return Examples(collection, self.pool_split, (lo, hi), what)
        return Examples(collection, self.pool_split, np.unique(self.index()[lo:hi]).astype(np.int64), what)


SOURCES: dict[str, Source] = {}


def declare_source(dataset: str, source: Source) -> None:
    """Declare where ``dataset``'s examples come from (next to its ``DATASETS`` registration)."""
    SOURCES[dataset] = source


def examples_of(dataset: str, split: str, start: int = 0, stop: int | None = None, *, spec: DataSpec) -> Examples:
    """Examples ``start..stop-1`` (``stop`` None: to the end) of ``split`` of ``dataset``, as collection indices.

    ``spec`` supplies ``root`` and ``test_fraction`` (how a pool is split). A dataset without a declared
    source is its own collection (``undeclared:<name>``) with unknown indices.
    """
    source = SOURCES.get(dataset)
    if source is None:
        return Examples(f"undeclared:{dataset}", split, None, _what(dataset, split, start, stop),
                        f"dataset {dataset!r} declares no source (fedsim.data.sources.declare_source)")
    return source.examples(dataset, split, start, stop, spec)


def client_examples(spec: DataSpec) -> Examples:
    """What a scenario's clients hold: the first ``train_subset`` (default: all) training examples."""
    return examples_of(spec.dataset, "train", 0, spec.train_subset, spec=spec)


def _as_range(indices: Indices) -> tuple[int, float]:
    start, stop = indices  # type: ignore[misc]
    return int(start), float("inf") if stop is None else int(stop)


def _first_common(a: Indices, b: Indices) -> int | None:
    """The smallest index in both sets (None when disjoint)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        (a0, a1), (b0, b1) = _as_range(a), _as_range(b)
        return max(a0, b0) if max(a0, b0) < min(a1, b1) else None
    if isinstance(a, tuple):
        a, b = b, a
    if isinstance(b, tuple):
        b0, b1 = _as_range(b)
        hit = a[(a >= b0) & (a < b1)]
    else:
        hit = np.intersect1d(a, b, assume_unique=True)
    return int(hit[0]) if len(hit) else None


def overlap(a: Examples, b: Examples) -> str | None:
    """None when ``a`` and ``b`` provably share no example; else why they (may) share one."""
    if a.collection != b.collection:
        undeclared = [e for e in (a, b) if e.collection.startswith("undeclared:")]
        if undeclared:
            return f"{undeclared[0].unknown}, so fedsim cannot tell whether it holds the other's images"
        return None
    if a.split is not None and b.split is not None and a.split != b.split:
        return None
    unknown = next((e for e in (a, b) if e.split is None or e.indices is None), None)
    if unknown is not None:
        return f"both come from {a.collection}, and {unknown.unknown or 'the range of ' + unknown.what + ' is unknown'}"
    common = _first_common(a.indices, b.indices)  # type: ignore[arg-type]
    if common is None:
        return None
    return f"both hold {a.collection} {a.split} image {common}"
