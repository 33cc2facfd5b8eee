"""What every black-box task family shares: the registry entry, the unit-box map, the field rules and the
class-skewed split of a labelled pool among clients (spec ``algorithms-more.md`` §11.1, §11.7).

A family is a :class:`TaskFamily` registered in :data:`TASKS` by its module (``fedsim/zo/tasks/__init__.py``
imports them all). Its ``check`` refuses a bad :class:`~fedsim.zo.spec.ZOTask` without building anything heavy;
its ``build`` turns ``(task, num_clients, seed)`` into a :class:`~fedsim.zo.api.FederatedObjective`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedsim.errors import ScenarioError
from fedsim.isolation import torch_threads
from fedsim.registry import Registry
from fedsim.zo.api import FederatedObjective
from fedsim.zo.spec import ZOTask

# ZOTask fields every family reads (the rest are refused unless the family lists them).
COMMON_FIELDS = frozenset({"family"})


@dataclass(frozen=True)
class TaskFamily:
    """One task family: the ``ZOTask`` fields it reads, a cheap check and the builder.

    ``check(task, num_clients)`` raises :class:`~fedsim.errors.ScenarioError` with a path relative to the task
    block (``dataset``, ``class_portion``, ...), or :class:`FieldError` for a field outside it (``federation.clients``);
    ``dim(task, num_clients)`` is the d the task will have (called after ``check``, cheap: validation checks the
    settings bounded by d with it); ``build(task, num_clients, seed)`` is deterministic in its arguments.
    """

    fields: frozenset[str]
    check: Callable[[ZOTask, int], None]
    build: Callable[[ZOTask, int, int], FederatedObjective]
    dim: Callable[[ZOTask, int], int]
    summary: str = ""  # one line for ``fedsim list``


class FieldError(ScenarioError):
    """A task check's error whose ``path`` is a whole scenario path (e.g. ``federation.clients``), not one relative
    to the task block: the callers that prefix relative paths pass it on unchanged."""


TASKS: Registry[TaskFamily] = Registry("zeroth-order task family")


def refuse_unused(task: ZOTask, fields: frozenset[str]) -> None:
    """Refuse a field the YAML set (even to its default) that ``task.family`` does not read."""
    for name in sorted(task.model_fields_set - fields - COMMON_FIELDS):
        raise ScenarioError(name, f"not used by the {task.family} task (it reads: "
                                  f"{', '.join(sorted(fields)) or 'nothing else'}); remove it")


def as_points(x: torch.Tensor, dim: int) -> np.ndarray:
    """A query batch ``(n, dim)`` (or one point ``(dim,)``) -> a float64 NumPy array ``(n, dim)``.

    Raises ``ValueError`` on another shape (a client asking the wrong question is a bug, not user input).
    """
    arr = torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"a query batch must be (n, {dim}) points in [0, 1]^{dim}, got {tuple(arr.shape)}")
    return arr


def to_box(u: np.ndarray, half_width: float) -> np.ndarray:
    """Clip ``u`` to [0, 1], then map it affinely onto [-half_width, half_width] (0.5 -> 0; spec §11.1)."""
    return (np.clip(u, 0.0, 1.0) * 2.0 - 1.0) * half_width


def as_values(v: np.ndarray) -> torch.Tensor:
    """``(n,)`` values -> a new float64 tensor (what every ClientFunction returns)."""
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).copy())


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one BLAS / torch thread: float summation order, hence every number a task computes,
    must not depend on how many threads the process (a Ray actor, the driver) happens to have."""
    with torch_threads(1), threadpool_limits(limits=1):
        yield


def own_classes(num_classes: int, num_clients: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Each client's own classes: ``order[i::num_clients]`` (sorted), ``order`` a permutation of the classes
    (default: identity, so client i owns i, i + N, ...). Needs ``num_clients <= num_classes``."""
    order = np.arange(num_classes) if order is None else np.asarray(order)
    return [sorted(int(c) for c in order[i::num_clients]) for i in range(num_clients)]


def class_skewed_split(labels: np.ndarray, owners: list[list[int]], portion: float,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """Split the indices of ``labels`` (n,) disjointly among ``len(owners)`` clients, class by class.

    Each class's examples (shuffled by ``rng``) go ``portion`` to its owner (split evenly among owners when it
    has several) and ``(1 - portion) / (N - 1)`` to every other client, so that a client's own classes make up
    about ``portion`` of its data when the classes are balanced (exactly for equal class sizes and an equal
    number of own classes). One client takes everything. Returns each client's sorted indices.
    """
    n_clients = len(owners)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        holders = [i for i in range(n_clients) if int(c) in owners[i]]
        share = np.zeros(n_clients)
        if n_clients == 1:
            share[0] = 1.0
        else:
            share[:] = (1.0 - portion) / (n_clients - 1)
            share[holders] = portion / max(len(holders), 1)
        cuts = np.round(np.cumsum(share / share.sum()) * len(idx)).astype(int)
        start = 0
        for i, stop in enumerate(cuts):
            parts[i].append(idx[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


def check_class_split(task: ZOTask, num_clients: int, num_classes: int, dataset: str) -> None:
    """Refuse more clients than classes: every client needs at least one class of its own."""
    if num_clients > num_classes:
        raise FieldError("federation.clients", f"{num_clients} clients is more than the {num_classes} classes of "
                                               f"{dataset}: the {task.family} task gives every client at least one "
                                               "class of its own")


def check_dataset(task: ZOTask, num_clients: int, usable: dict[str, int], default: str) -> str:
    """The task's dataset name (``task.dataset`` or ``default``), refused at ``dataset`` unless it is one of the
    bundled sets in ``usable`` (name -> classes), and the class split checked against it (:func:`check_class_split`)."""
    name = task.dataset or default
    if name not in usable:
        from fedsim.data import DATASETS

        known = "a fedsim dataset, but " if name in DATASETS else "unknown; "
        raise ScenarioError("dataset", f"{name!r} is {known}the {task.family} task trains on a bundled (offline) "
                                       f"set with enough examples: {', '.join(sorted(usable))}")
    check_class_split(task, num_clients, usable[name], name)
    return name
