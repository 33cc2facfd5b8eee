"""Finite-difference gradient estimators of the zeroth-order baselines (spec §11.5, the authors' ``rgf_opt``).

RGF (random gradient-free, Nesterov & Spokoiny 2017 with orthonormal directions): draw q Gaussian directions,
orthonormalise them (Gram-Schmidt), and average forward differences

    g = (1/q) sum_k (f(x + mu u_k) - f(x)) / mu * u_k.

On a linear function ``f(x) = a.x + c`` this is exactly ``(1/q) U^T U a`` (U the (q, d) direction matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def orthonormal_directions(dim: int, q: int, generator: torch.Generator) -> Tensor:
    """q orthonormal directions ``(q, d)`` float64: q standard Gaussian vectors, Gram-Schmidt orthonormalised in
    draw order (computed as a QR factorisation with the signs fixed so that R's diagonal is positive, which gives
    the classical Gram-Schmidt vectors).

    Raises:
        ValueError: q < 1 or q > d (more than d directions cannot be orthonormal; the authors' code then divides
            by ~0).
    """
    if not 1 <= q <= dim:
        raise ValueError(f"RGF needs 1 <= directions <= d (got directions={q}, d={dim})")
    g = torch.randn(q, dim, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(g.T)  # g.T = Q R, Q (d, q)
    sign = torch.sign(torch.diagonal(R))
    sign[sign == 0] = 1.0
    return (Q * sign).T.contiguous()


def rgf_gradient(f: Callable[[Tensor], Tensor], x: Tensor, *, directions: int, mu: float,
                 generator: torch.Generator, fx: float | None = None) -> tuple[Tensor, int]:
    """The RGF forward-difference estimate of ``grad f(x)`` (spec §11.5).

    Args:
        f: the black box, ``(n, d) -> (n,)``; called once with the q probe points ``x + mu u_k`` (and once with
            ``x`` when ``fx`` is not given). The probes are not clipped: the task clips (spec §11.1).
        x: (d,) the point.
        directions: q; mu: the step (> 0).
        generator: the source of the directions.
        fx: ``f(x)`` when already known (then it is not queried again).
    Returns:
        ``(g, queries)``: g (d,) float64 and the number of points queried, ``q + 1`` (``q`` when ``fx`` is given).
    """
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if not mu > 0:
        raise ValueError(f"RGF step mu must be > 0 (got {mu})")
    U = orthonormal_directions(x.shape[0], directions, generator)
    queries = directions
    if fx is None:
        fx = float(f(x.reshape(1, -1))[0])
        queries += 1
    fu = torch.as_tensor(f(x.unsqueeze(0) + mu * U), dtype=torch.float64).reshape(-1)
    g = ((fu - fx) / mu) @ U / directions
    return g, queries
