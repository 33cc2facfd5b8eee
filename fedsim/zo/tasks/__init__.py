"""The black-box task families of a zeroth-order federation (spec ``algorithms-more.md`` §11.1, §11.7).

:data:`TASKS` maps a family name (``zeroth_order.task.family``) to its :class:`~fedsim.zo.tasks.base.TaskFamily`:
``quadratic`` (synthetic, :mod:`~fedsim.zo.tasks.quadratic`), ``metric`` (1 - macro-metric of a perturbed
classifier on each client's private data, :mod:`~fedsim.zo.tasks.metric`) and ``adversarial`` (a black-box
attack on per-client classifiers, :mod:`~fedsim.zo.tasks.adversarial`). A new family registers itself with
``TASKS.add(name, TaskFamily(...))`` in a module imported here.

:func:`build_objective` is what a client process and the runner call (each rebuilds the objective: it is
deterministic in ``(task, num_clients, seed)`` and cached per process); :func:`check_task` is what validation
calls (no training, except the adversarial family's check, which trains the client models once per process to
make sure the chosen image exists: what validates must run).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import replace
from threading import Lock

from fedsim.errors import ScenarioError
from fedsim.zo.api import FederatedObjective
from fedsim.zo.spec import ZerothOrderSpec
from fedsim.zo.tasks import adversarial, metric, quadratic  # noqa: F401  (register the families)
from fedsim.zo.tasks.base import TASKS, FieldError, TaskFamily
from fedsim.zo.tasks.base import one_thread as _one_thread

__all__ = ["TASKS", "FieldError", "TaskFamily", "build_objective", "check_task", "task_dim"]

_CACHE_SIZE = 4
_CACHE: OrderedDict[tuple[str, int, int], FederatedObjective] = OrderedDict()
_LOCK = Lock()


def check_task(spec: ZerothOrderSpec, num_clients: int) -> None:
    """Refuse a task this family cannot build for ``num_clients`` clients.

    Raises :class:`~fedsim.errors.ScenarioError` whose path is relative to the ``zeroth_order`` block
    (``task.dataset``, ``task.class_portion``, ...; the scenario validator prefixes ``zeroth_order.``): a field
    the family does not read, an unknown or non-offline dataset, more clients than a class split allows, an
    ``image_index`` beyond the eligible images. A :class:`FieldError` (a field outside the block, e.g.
    ``federation.clients``) passes unchanged.
    """
    task = spec.task
    family = TASKS.get(task.family)
    try:
        family.check(task, num_clients)
    except FieldError:
        raise
    except ScenarioError as err:
        raise ScenarioError(f"task.{err.path}" if err.path else "task", err.reason) from None


def task_dim(spec: ZerothOrderSpec, num_clients: int) -> int:
    """The dimension d of the task ``spec.task`` for ``num_clients`` clients (after :func:`check_task` passed),
    without building the objective."""
    return int(TASKS.get(spec.task.family).dim(spec.task, num_clients))


def build_objective(spec: ZerothOrderSpec, num_clients: int, seed: int) -> FederatedObjective:
    """The federated objective of ``spec.task`` for ``num_clients`` clients, deterministic in
    ``(spec.task, num_clients, seed)`` (on any backend and thread count).

    Built once per process and cached (the last few keys); each call returns a copy whose ``x0`` and ``truth``
    the caller may change (the client functions are shared and stateless). Raises what :func:`check_task`
    raises for a bad task.
    """
    check_task(spec, num_clients)
    key = (spec.task.model_dump_json(), int(num_clients), int(seed))
    with _LOCK:
        obj = _CACHE.get(key)
        if obj is None:
            with _one_thread():
                obj = TASKS.get(spec.task.family).build(spec.task, int(num_clients), int(seed))
            _CACHE[key] = obj
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
    return replace(obj, x0=obj.x0.clone(), clients=list(obj.clients), weights=list(obj.weights),
                   truth=copy.deepcopy(obj.truth))
