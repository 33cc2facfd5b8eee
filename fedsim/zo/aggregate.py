"""The server's arithmetic in a zeroth-order federation (spec §11.5, §11.6), with no Flower code.

One round, as the ServerApp runs it:

1. send ``x_r`` and :func:`server_payload` (from round 2) to every client; receive ``x_{i,r}`` (+ scaffold2 ``c_i``);
2. ``x_cand = next_point(x_r, locals, weights, global_lr)``;
3. safeguard ``"message"``: ask every client :meth:`ZOClient.values` at ``x_cand`` (and ``x_r`` in round 1), then
   ``x_{r+1} = x_cand if accept(global_value(F_prev), global_value(F_cand)) else x_r`` (the authors keep x_r when
   ``F(x_r) <= F(x_cand)``, evaluating the oracle F: here the clients' replies);
4. ``radii(x_{r+1}, locals)``; second exchange (:data:`SECOND_EXCHANGE`): fzoos refresh -> RFF messages ->
   :func:`fedsim.zo.rff.aggregate`; scaffold1 control variates;
5. :func:`server_payload` for the next round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedsim.zo.api import GlobalSurrogate

SECOND_EXCHANGE: dict[str, str] = {"fzoos": "surrogate", "scaffold1": "control"}
"""Methods with a second exchange per round, and what it returns (fzoos: RFF messages from ``ZOClient.refresh``;
scaffold1: control variates from ``ZOClient.control_variate``). Others have none."""


def _check_weights(n: int, weights: Sequence[float]) -> list[float]:
    if n == 0 or len(weights) != n:
        raise ValueError(f"need one weight per client reply (got {n} replies, {len(weights)} weights)")
    return [float(w) for w in weights]


def next_point(x_r: Tensor, locals_: Sequence[Tensor], weights: Sequence[float], global_lr: float) -> Tensor:
    """``x_r - eta * sum_i w_i (x_r - x_{i,r})`` clipped to [0, 1]^d (spec §11.6 step 3; eta = 1 gives the
    weighted average). ``x_r`` (d,), each local (d,) -> (d,) float64."""
    w = _check_weights(len(locals_), weights)
    x_r = torch.as_tensor(x_r, dtype=torch.float64).reshape(-1)
    step = sum(wi * (x_r - torch.as_tensor(xi, dtype=torch.float64).reshape(-1))
               for wi, xi in zip(w, locals_, strict=True))
    return (x_r - float(global_lr) * step).clamp(0.0, 1.0)


def radii(x_next: Tensor, locals_: Sequence[Tensor]) -> list[float]:
    """Each client's refresh radius ``r_i = mean_k |x_{r+1,k} - x_{i,r,k}| / 2`` (spec §11.5)."""
    x_next = torch.as_tensor(x_next, dtype=torch.float64).reshape(-1)
    return [float((x_next - torch.as_tensor(xi, dtype=torch.float64).reshape(-1)).abs().mean() / 2)
            for xi in locals_]


def global_value(values: Sequence[float], weights: Sequence[float]) -> float:
    """``F(x) = sum_i w_i f_i(x)`` from the clients' value replies (one per client, in weight order)."""
    w = _check_weights(len(values), weights)
    return float(sum(wi * float(v) for wi, v in zip(w, values, strict=True)))


def accept(f_prev: float, f_next: float) -> bool:
    """The safeguard: move to the candidate only if it strictly lowers F (the authors keep x_r when
    ``F(x_r) <= F(x_cand)``)."""
    return f_next < f_prev


def server_payload(method: str, *, surrogate: GlobalSurrogate | None = None,
                   controls: Sequence[Tensor] | None = None,
                   weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The extras the server sends with ``x_r`` (read by ``ZOClient.train``).

    * fzoos: ``{"nu": (M,), "offset": ()}`` from the global surrogate of the last refresh (``{}`` before any);
    * scaffold1 / scaffold2: ``{"c": (d,)}`` with ``c = sum_i w_i c_i`` over the clients' control variates
      (scaffold1: from the last second exchange; scaffold2: the ``"c_i"`` of the last phase-1 replies);
    * fedzo / fedprox: ``{}``.
    """
    if method == "fzoos":
        if surrogate is None:
            return {}
        return {"nu": surrogate.nu.to(torch.float64).clone(),
                "offset": torch.tensor(surrogate.offset, dtype=torch.float64)}
    if method in ("scaffold1", "scaffold2"):
        if not controls:
            return {}
        w = _check_weights(len(controls), weights or [])
        c = sum(wi * torch.as_tensor(ci, dtype=torch.float64) for wi, ci in zip(w, controls, strict=True))
        return {"c": torch.as_tensor(c, dtype=torch.float64)}
    if method in ("fedzo", "fedprox"):
        return {}
    raise ValueError(f"unknown zeroth-order method {method!r}")
