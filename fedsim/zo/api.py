"""The data types every part of the zeroth-order protocol shares (no behaviour here).

Conventions: a point ``x`` is a float64 tensor of shape ``(d,)`` in the unit box ``[0, 1]^d`` (tasks map it
affinely into their own box, clipping first: spec §11.1); a batch of points is ``(n, d)``; values are float64.
Lower is better (every task is a minimisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

ClientFunction = Callable[[Tensor], Tensor]
"""One client's private black box: ``(n, d)`` float64 points in [0, 1]^d -> ``(n,)`` float64 values; no gradient.
Every call is a query of n points (the client counts them)."""


@dataclass
class FederatedObjective:
    """A task instance: ``F(x) = sum_i weights[i] * f_i(x)`` (spec §11.1).

    ``clients[i]`` is client i's black box: only client i may call it (the ClientApp); the runner may call
    ``value`` (the global objective for the utility curve, never shown to the server) and the evaluator reads
    ``truth`` (e.g. ``{"classes": [[0, 3], ...]}``: which classes each client's private data holds).
    """

    name: str
    dim: int
    x0: Tensor  # (d,) float64 starting point in [0, 1]^d
    clients: list[ClientFunction]
    weights: list[float]  # w_i, summing to 1 (1/N in the paper)
    truth: dict[str, object] = field(default_factory=dict)
    success_below: float | None = None  # e.g. 0.0 for the adversarial task (attack success when F < 0)

    def value(self, x: Tensor) -> float:
        """The global objective at one point ``x`` (d,) (evaluator side: not a counted query)."""
        pts = x.reshape(1, -1).to(torch.float64)
        return float(sum(w * float(f(pts)[0]) for w, f in zip(self.weights, self.clients, strict=True)))


@dataclass
class RFFMessage:
    """What a FZooS client sends in the surrogate refresh (spec §11.3, §11.6 step 4): the weights ``nu`` (M,)
    of its min-norm (or ridge) RFF fit to min-max-normalised values, and the value range ``y_min``, ``y_max``,
    so that ``mu_i(x) = (y_max - y_min) * phi(x) @ nu + y_min``."""

    nu: Tensor  # (M,) float64
    y_min: float
    y_max: float


@dataclass
class GlobalSurrogate:
    """The server's aggregate ``mu(x) = phi(x) @ nu + offset`` with ``nu = sum_i w_i (y_max,i - y_min,i) nu_i`` and
    ``offset = sum_i w_i y_min,i`` (linear in the client messages, hence SecAgg-compatible: spec §11.3)."""

    nu: Tensor  # (M,) float64
    offset: float


@dataclass
class ZORoundView:
    """What the honest-but-curious server saw in one round of a zeroth-order federation (spec §11.6): the attacks'
    only input. Keys are partition ids. Under ``fedsim.defenses.secagg`` the ``surrogates`` are the masked vectors as
    received (individually meaningless) and ``aggregate`` is their sum; otherwise ``aggregate`` is what the server
    computed from them. Ground truth (the objective itself) is never here."""

    round: int
    x_r: Tensor  # (d,) the point broadcast at the start of the round
    x_next: Tensor  # (d,) the next global point (x_r again when the safeguard kept it)
    local: dict[int, Tensor] = field(default_factory=dict)  # x_{i,r}: the phase-1 replies
    payload: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # method extras of phase 1 (SCAFFOLD c_i)
    values: dict[int, float] = field(default_factory=dict)  # safeguard replies f_i(x_next candidate)
    radius: dict[int, float] = field(default_factory=dict)  # r_i sent with the refresh
    surrogates: dict[int, RFFMessage] = field(default_factory=dict)  # FZooS refresh replies
    aggregate: GlobalSurrogate | None = None
    secagg: bool = False  # the server ran SecAgg over nu_i (its own protocol: it knows), so surrogates are shares
