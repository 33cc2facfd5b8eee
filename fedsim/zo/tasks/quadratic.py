"""The synthetic ``quadratic`` family (FZooS authors' ``funcs/synthetics.py: Quadratic``; spec §11.7).

``f_i(x) = (0.1 / d) * (c1_i . p(x)^2 + c2_i . p(x) + 1)`` with ``p(x) = 20 * clip(x, 0, 1) - 10`` (the unit box
onto [-10, 10]^d). For every coordinate j the N clients' coefficients are ``1 + div * (D_j - 1/N)`` with
``D_j ~ Dirichlet(1/N, ..., 1/N)`` (one draw per coordinate, client i takes entry i), drawn twice (c1, c2) as the
authors do; ``div`` is ``task.heterogeneity`` (authors' README: 0.5). Since each ``D_j`` sums to 1 the coefficients
average to exactly 1 over clients, so the global objective with ``w_i = 1/N`` is the same for every draw:
``F(x) = (0.1 / d) * (|p|^2 + sum(p) + 1)``, minimised at ``p = -0.5`` (``x = 0.475``) with
``F* = 0.1 / d - 0.025``. ``div = 0`` makes every client identical. With ``div > N`` a coefficient can turn negative
(a concave coordinate: still bounded on the box).

``x0`` is the authors' default: uniform on [0, 1]^d, drawn from the seed. ``d = task.dim`` (default 300).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.errors import ScenarioError
from fedsim.seeding import numpy_rng
from fedsim.zo.api import FederatedObjective
from fedsim.zo.spec import ZOTask
from fedsim.zo.tasks.base import TASKS, TaskFamily, as_points, as_values, refuse_unused

DEFAULT_DIM = 300
BOUND = 10.0  # p(x) lies in [-BOUND, BOUND]^d
FIELDS = frozenset({"dim", "heterogeneity"})


def project(x: np.ndarray) -> np.ndarray:
    """Unit box -> [-10, 10] coordinate-wise, clipping first (authors' ``Quadratic.project``)."""
    return np.clip(x, 0.0, 1.0) * (2.0 * BOUND) - BOUND


@dataclass(frozen=True)
class QuadraticClient:
    """Client i's black box (picklable): ``(n, d)`` float64 -> ``(n,)`` float64 values of ``f_i``."""

    c1: np.ndarray  # (d,) coefficients of p^2
    c2: np.ndarray  # (d,) coefficients of p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = self.c1.shape[0]
        p = project(as_points(x, d))
        # Elementwise products and NumPy's pairwise sum: no BLAS, so the value does not depend on threads.
        return as_values((0.1 / d) * ((p * p * self.c1).sum(axis=1) + (p * self.c2).sum(axis=1) + 1.0))


def coefficients(num_clients: int, dim: int, div: float, rng: np.random.Generator) -> np.ndarray:
    """``(2, N, d)``: ``[c1, c2]`` per client, each ``1 + div * (Dirichlet(1/N)^(d draws) - 1/N)``."""
    alpha = np.full(num_clients, 1.0 / num_clients)
    draws = [rng.dirichlet(alpha, size=dim).T for _ in range(2)]  # each (N, d); columns sum to 1
    return 1.0 + div * (np.stack(draws) - 1.0 / num_clients)


def check(task: ZOTask, num_clients: int) -> None:
    refuse_unused(task, FIELDS)
    if num_clients < 1:
        raise ScenarioError("family", "needs at least one client")


def build(task: ZOTask, num_clients: int, seed: int) -> FederatedObjective:
    """The quadratic objective of ``num_clients`` clients; coefficients and ``x0`` drawn from ``seed``."""
    dim = task.dim or DEFAULT_DIM
    coeffs = coefficients(num_clients, dim, task.heterogeneity, numpy_rng(seed, "zo-task", "quadratic", "coeffs"))
    x0 = numpy_rng(seed, "zo-task", "quadratic", "x0").uniform(0.0, 1.0, size=dim)
    clients = [QuadraticClient(coeffs[0, i].copy(), coeffs[1, i].copy()) for i in range(num_clients)]
    return FederatedObjective(
        name="quadratic",
        dim=dim,
        x0=torch.from_numpy(x0),
        clients=list(clients),
        weights=[1.0 / num_clients] * num_clients,
        truth={"minimiser_coordinate": (BOUND - 0.5) / (2.0 * BOUND),  # every coordinate of argmin F
               "global_minimum": 0.1 / dim - 0.025, "heterogeneity": task.heterogeneity},
    )


def dim(task: ZOTask, num_clients: int) -> int:
    """d: ``task.dim`` or 300."""
    return task.dim or DEFAULT_DIM


TASKS.add("quadratic", TaskFamily(fields=FIELDS, check=check, build=build, dim=dim,
                                  summary="synthetic heterogeneous quadratics on [-10, 10]^d (d = task.dim)"))
