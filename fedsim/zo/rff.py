"""Random-Fourier-feature (RFF) surrogates: FZooS's communication format (spec §11.3).

A client compresses its local surrogate into weights ``nu`` (M,) over features shared by seed:

    phi(x) = sqrt(2/M) * cos(x @ Omega^T + b),   Omega ~ N(0, l^-2 I)  (M, d),   b ~ U[0, 2 pi)  (M,)

so that ``phi(x) @ phi(y)`` approximates the RBF kernel ``exp(-|x - y|^2 / (2 l^2))`` (Rahimi & Recht 2007; the
authors use sklearn's ``RBFSampler`` with ``gamma = 1 / (2 l^2)``, which draws the same distributions). The client's
surrogate is ``mu_i(x) = (y_max - y_min) * phi(x) @ nu_i + y_min`` with gradient
``-(y_max - y_min) * sqrt(2/M) * Omega^T [sin(Omega x + b) * nu_i]``; the server's global surrogate
``sum_i w_i mu_i`` has weights ``sum_i w_i (y_max,i - y_min,i) nu_i`` and offset ``sum_i w_i y_min,i`` (linear in the
messages, hence SecAgg-compatible).

Everything is float64 on the CPU. Omega is M x d (M = 10,000, d = 784: 63 MB), so features are computed in row
chunks that keep each intermediate under ~64 MB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from fedsim.seeding import torch_generator
from fedsim.zo.api import GlobalSurrogate, RFFMessage

_CHUNK_BYTES = 64 * 2**20


class RFFBasis:
    """The shared random features: ``Omega`` (M, d) and ``b`` (M,), drawn from
    ``fedsim.seeding.torch_generator(seed, "zo", "rff")`` so every client and the server build the identical basis
    from the scenario seed (spec §11.3: the authors share it through ``random_state=0``).

    Args:
        dim: d, the point dimension (>= 1).
        features: M, the number of features (>= 1).
        lengthscale: l > 0 of the approximated RBF kernel (authors: 1.0).
        seed: the scenario seed.
    Raises:
        ValueError: a non-positive dim, features or lengthscale.
    """

    def __init__(self, dim: int, features: int, lengthscale: float, seed: int) -> None:
        if dim < 1 or features < 1 or not lengthscale > 0:
            raise ValueError(f"RFFBasis needs dim >= 1, features >= 1, lengthscale > 0 (got {dim}, {features}, "
                             f"{lengthscale})")
        self.dim, self.features, self.lengthscale, self.seed = int(dim), int(features), float(lengthscale), int(seed)
        gen = torch_generator(self.seed, "zo", "rff")
        self.omega = torch.randn(self.features, self.dim, generator=gen, dtype=torch.float64) / self.lengthscale
        self.bias = torch.rand(self.features, generator=gen, dtype=torch.float64) * (2.0 * math.pi)
        self.scale = math.sqrt(2.0 / self.features)

    def _rows_per_chunk(self) -> int:
        return max(1, _CHUNK_BYTES // (8 * self.features))

    def _check(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RFF points must have shape (n, {self.dim}), got {tuple(x.shape)}")
        return x

    def phi(self, x: Tensor) -> Tensor:
        """Features ``(n, d) -> (n, M)`` float64."""
        x = self._check(x)
        rows = self._rows_per_chunk()
        out = [self.scale * torch.cos(torch.addmm(self.bias, c, self.omega.T)) for c in x.split(rows)]
        return torch.cat(out) if out else x.new_zeros(0, self.features)

    def project(self, x: Tensor, w: Tensor) -> Tensor:
        """``phi(x) @ w`` for points ``(n, d)`` and weights ``(M,)`` -> ``(n,)``, without keeping phi in memory."""
        x = self._check(x)
        w = torch.as_tensor(w, dtype=torch.float64)
        out = [(self.scale * torch.cos(torch.addmm(self.bias, c, self.omega.T))) @ w
               for c in x.split(self._rows_per_chunk())]
        return torch.cat(out) if out else x.new_zeros(0)

    def grad_project(self, x: Tensor, w: Tensor) -> Tensor:
        """``d/dx [phi(x) @ w] = -sqrt(2/M) Omega^T [sin(Omega x + b) * w]`` for one point ``(d,)`` -> ``(d,)``."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ValueError(f"RFF gradient point must have shape ({self.dim},), got {tuple(x.shape)}")
        s = torch.sin(torch.addmv(self.bias, self.omega, x))
        return -self.scale * (self.omega.T @ (s * torch.as_tensor(w, dtype=torch.float64)))


@lru_cache(maxsize=2)
def shared_basis(dim: int, features: int, lengthscale: float, seed: int) -> RFFBasis:
    """A process-wide cache of :class:`RFFBasis` (drawing Omega for M = 10,000, d = 784 takes ~0.1 s and 63 MB);
    the returned object must not be modified."""
    return RFFBasis(dim, features, lengthscale, seed)


def fit_weights(basis: RFFBasis, X: Tensor, y: Tensor, ridge: float = 0.0, y_noise: float = 0.0,
                nu_noise: float = 0.0, generator: torch.Generator | None = None) -> RFFMessage:
    """Fit a client's RFF weights to its queries (spec §11.3; defenses of ``spec.MessageDefenses``).

    The values are min-max normalised, ``yt = (y - y_min) / (y_max - y_min)`` (all zero when the range is 0), then
    ``yt += y_noise * N(0, 1)`` if asked, then

    * ``ridge == 0``: the minimum-norm least-squares solution of ``phi(X) nu = yt`` (the authors'
      ``Ridge(alpha=0, fit_intercept=False)``), via the SVD-based ``gelsd`` driver; with n < M well-spread points it
      interpolates;
    * ``ridge > 0``: ``argmin |phi(X) nu - yt|^2 + ridge |nu|^2`` in its dual form
      ``nu = phi^T (phi phi^T + ridge I)^-1 yt`` (sklearn ``Ridge(alpha=ridge, fit_intercept=False)``);

    and finally ``nu += nu_noise * N(0, 1)`` if asked. The reported ``y_min``/``y_max`` are the true range.

    Args:
        basis: the shared features.
        X: (n, d) query points; y: (n,) their values (n >= 1).
        ridge, y_noise, nu_noise: >= 0.
        generator: the source of the defense noise; required when ``y_noise`` or ``nu_noise`` is > 0.
    Returns:
        An :class:`RFFMessage` with ``nu`` (M,) float64.
    Raises:
        ValueError: mismatched shapes, no points, a negative setting, or noise asked without a generator.
    """
    X = basis._check(X)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"fit_weights needs n >= 1 points with one value each (X {tuple(X.shape)}, y "
                         f"{tuple(y.shape)})")
    if ridge < 0 or y_noise < 0 or nu_noise < 0:
        raise ValueError(f"ridge, y_noise and nu_noise must be >= 0 (got {ridge}, {y_noise}, {nu_noise})")
    if (y_noise > 0 or nu_noise > 0) and generator is None:
        raise ValueError("fit_weights: y_noise / nu_noise need a generator (per-client seeded noise)")
    y_min, y_max = float(y.min()), float(y.max())
    span = y_max - y_min
    yt = (y - y_min) / span if span > 0 else torch.zeros_like(y)
    if y_noise > 0:
        yt = yt + y_noise * torch.randn(yt.shape, generator=generator, dtype=torch.float64)
    phi = basis.phi(X)
    if ridge > 0:
        gram = phi @ phi.T
        gram.diagonal().add_(ridge)
        nu = phi.T @ torch.linalg.solve(gram, yt)
    else:
        nu = torch.linalg.lstsq(phi, yt.unsqueeze(1), driver="gelsd").solution.reshape(-1)
    if nu_noise > 0:
        nu = nu + nu_noise * torch.randn(nu.shape, generator=generator, dtype=torch.float64)
    return RFFMessage(nu=nu.contiguous(), y_min=y_min, y_max=y_max)


def _weights_offset(s: RFFMessage | GlobalSurrogate) -> tuple[Tensor, float]:
    """``(w, c)`` with ``surrogate(x) = phi(x) @ w + c``."""
    if isinstance(s, RFFMessage):
        return s.nu * (s.y_max - s.y_min), s.y_min
    if isinstance(s, GlobalSurrogate):
        return s.nu, s.offset
    raise TypeError(f"expected an RFFMessage or a GlobalSurrogate, got {type(s).__name__}")


def surrogate_value(basis: RFFBasis, s: RFFMessage | GlobalSurrogate, x: Tensor) -> Tensor:
    """The surrogate at points ``x`` (n, d) -> (n,): ``(y_max - y_min) phi(x) @ nu + y_min`` for a client message,
    ``phi(x) @ nu + offset`` for the global surrogate (spec §11.3)."""
    w, c = _weights_offset(s)
    return basis.project(x, w) + c


def surrogate_grad(basis: RFFBasis, s: RFFMessage | GlobalSurrogate, x: Tensor) -> Tensor:
    """The surrogate's gradient at one point ``x`` (d,) -> (d,), in closed form (spec §11.3):
    ``-(y_max - y_min) sqrt(2/M) Omega^T [sin(Omega x + b) * nu]`` (global: scale 1)."""
    w, _ = _weights_offset(s)
    return basis.grad_project(x, w)


def aggregate(msgs: Sequence[RFFMessage], weights: Sequence[float]) -> GlobalSurrogate:
    """The server's global surrogate ``sum_i w_i mu_i`` (spec §11.3): ``nu = sum_i w_i (y_max,i - y_min,i) nu_i``,
    ``offset = sum_i w_i y_min,i``. The weights are used as given (normalise them before, if clients are missing).

    Raises:
        ValueError: no messages, or a count / length mismatch.
    """
    if not msgs or len(msgs) != len(weights):
        raise ValueError(f"aggregate needs one weight per message (got {len(msgs)} messages, {len(weights)} weights)")
    sizes = {int(m.nu.numel()) for m in msgs}
    if len(sizes) != 1:
        raise ValueError(f"aggregate: messages have different feature counts {sorted(sizes)}")
    nu = sum(float(w) * (m.y_max - m.y_min) * m.nu.to(torch.float64) for m, w in zip(msgs, weights, strict=True))
    offset = sum(float(w) * m.y_min for m, w in zip(msgs, weights, strict=True))
    return GlobalSurrogate(nu=torch.as_tensor(nu, dtype=torch.float64), offset=float(offset))
