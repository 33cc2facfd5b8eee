"""FZooS's local Gaussian-process surrogate with exact gradients (spec §11.2).

The hyperparameter fit is sklearn's, as the authors': ``GaussianProcessRegressor(Matern(nu=2.5), alpha=1e-6,
n_restarts_optimizer, random_state)`` on min-max normalised targets (no amplitude, no ``normalize_y``). The fitted
model is then re-implemented exactly in torch:

    k(x, x') = (1 + s + s^2 / 3) exp(-s),   s = sqrt(5) |x - x'| / l          (Matern 5/2, unit amplitude)
    mu(x)    = k(x, X) @ alpha,   alpha = (K + alpha_n I)^-1 yt              (sklearn's ``alpha_``)

so that the mean's gradient comes from autograd (the authors' ``approx_fprime`` with step 1e-20 is wrong: spec §11.8)
and the gradient's posterior covariance from the kernel's exact derivatives (the authors substitute a GPy RBF kernel):

    d/dx k(x, x_j)          = -a (1 + s_j) exp(-s_j) (x - x_j),   a = 5 / (3 l^2)
    d2/dx dx' k(x, x')|x=x' = a I
    Cov[grad f(x)]          = a I - J (K + alpha_n I)^-1 J^T,      J[:, j] = d/dx k(x, x_j)

Everything is reported in the original (un-normalised) units: the mean is ``y_min + span * mu``, the gradient
``span * grad mu`` and the variance ``span^2 * trace(Cov)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GP_NOISE = 1e-6  # sklearn alpha: jitter added to the kernel diagonal (the authors' value)
_SQRT5 = math.sqrt(5.0)


def matern52(x: Tensor, X: Tensor, lengthscale: float) -> Tensor:
    """The Matern-5/2 kernel matrix ``(n, d), (m, d) -> (n, m)`` (unit amplitude, as sklearn's ``Matern(nu=2.5)``).

    Distances are exact differences (not the |x|^2 + |y|^2 - 2 x.y shortcut, which loses ~1e-7 near coincident
    points); torch's distance backward returns 0 at a coincident pair, which is the true derivative of k there."""
    s = _SQRT5 * _dist(x, X) / lengthscale
    return (1.0 + s + s * s / 3.0) * torch.exp(-s)


def _dist(x: Tensor, X: Tensor) -> Tensor:
    return torch.cdist(x, X, compute_mode="donot_use_mm_for_euclid_dist")


def _kernel_grad_coef(x: Tensor, X: Tensor, lengthscale: float) -> Tensor:
    """``c[i, j] = -a (1 + s_ij) exp(-s_ij)`` so that ``d/dx k(x_i, X_j) = c[i, j] (x_i - X_j)``: (m, d), (n, d) ->
    (m, n)."""
    s = _SQRT5 * _dist(x, X) / lengthscale
    return -(5.0 / (3.0 * lengthscale**2)) * (1.0 + s) * torch.exp(-s)


def grad_variance(base: Tensor, xs: Tensor, lengthscale: float, noise: float = GP_NOISE) -> Tensor:
    """Trace of the posterior covariance of ``grad f`` at each candidate, for a unit-amplitude Matern-5/2 GP
    conditioned on the points ``base`` (spec §11.2; only the input locations matter, not the values).

    ``trace = d a - sum_jk Kinv_jk c_j c_k (x - x_j).(x - x_k)`` with ``Kinv = (K + noise I)^-1`` and
    ``c_j = -a (1 + s_j) exp(-s_j)``; the inner products are expanded around the candidates' centre ``z``
    (``e = x - z``, ``Y_j = x_j - z``) so that the cost is O(n^2 d + m n d + m n^2) instead of O(m n^2 d).

    Args:
        base: (n, d) conditioning points; xs: (m, d) candidates; lengthscale: l > 0; noise: diagonal jitter.
    Returns:
        (m,) float64.
    """
    base = torch.as_tensor(base, dtype=torch.float64)
    xs = torch.as_tensor(xs, dtype=torch.float64)
    K = matern52(base, base, lengthscale)
    K.diagonal().add_(noise)
    kinv = torch.cholesky_inverse(torch.linalg.cholesky(K))
    z = xs.mean(0)
    e, Y = xs - z, base - z
    c = _kernel_grad_coef(xs, base, lengthscale)  # (m, n)
    kc = c @ kinv  # (m, n): (Kinv c)_j per candidate (Kinv symmetric)
    ey = e @ Y.T  # (m, n)
    explained = ((e * e).sum(1) * (kc * c).sum(1) - 2.0 * (kc * c * ey).sum(1)
                 + ((c @ (kinv * (Y @ Y.T))) * c).sum(1))
    return xs.shape[1] * 5.0 / (3.0 * lengthscale**2) - explained


@dataclass
class GPSurrogate:
    """A fitted GP surrogate of one client's objective near its current iterate.

    ``X`` (n, d) training points, ``alpha`` (n,) sklearn's ``alpha_`` (dual weights on normalised targets),
    ``lengthscale`` the fitted Matern length-scale, ``y_min``/``span`` the normalisation
    (``yt = (y - y_min) / span``), ``noise`` the diagonal jitter."""

    X: Tensor
    alpha: Tensor
    lengthscale: float
    y_min: float
    span: float
    noise: float = GP_NOISE

    def mean(self, x: Tensor) -> Tensor:
        """Posterior mean in original units at ``x`` (n, d) -> (n,) (differentiable in x)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        return self.y_min + self.span * (matern52(x, self.X, self.lengthscale) @ self.alpha)

    def grad(self, x: Tensor) -> Tensor:
        """Gradient of the posterior mean at one point ``x`` (d,) -> (d,), by autograd on :meth:`mean`."""
        xv = torch.as_tensor(x, dtype=torch.float64).detach().reshape(1, -1).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.mean(xv).sum(), xv)
        return g.reshape(-1).detach()

    def grad_variance(self, xs: Tensor, extra: Tensor | None = None) -> Tensor:
        """Trace of the gradient's posterior covariance at candidates ``xs`` (m, d) -> (m,), original units
        (``span^2`` times :func:`grad_variance`), conditioned on the training points plus ``extra`` (k, d) if given
        (e.g. the point just queried, whose value is not in the fit yet)."""
        base = self.X if extra is None else torch.cat([self.X, torch.as_tensor(extra, dtype=torch.float64)])
        return self.span**2 * grad_variance(base, xs, self.lengthscale, self.noise)


def initial_lengthscale(X: Tensor) -> float:
    """Where the length-scale optimisation starts: the median distance between distinct training points (the
    median heuristic), 1.0 when there is none.

    The authors start at sklearn's default 1.0 with 20 restarts. From 1.0, points a few hundredths apart (FZooS's
    exploration boxes) make L-BFGS slide onto the flat plateau at the lower bound 1e-5, where the mean is a sum
    of spikes and its gradient is exactly 0 (FZooS then never moves); 20 restarts usually find the real optimum,
    the CPU-sized 2 do not. Starting at the data's scale finds it with no restart (sklearn keeps the best
    log-marginal likelihood of all starts, so this start can only improve on the default's)."""
    d = torch.pdist(X)
    d = d[d > 0]
    return float(d.median()) if d.numel() else 1.0


def fit_gp(X: Tensor, y: Tensor, *, restarts: int, seed: int, noise: float = GP_NOISE) -> GPSurrogate:
    """Fit the authors' GP (spec §11.2, §11.7) with sklearn and wrap it as a :class:`GPSurrogate`; the length-scale
    search starts at :func:`initial_lengthscale` (a deviation: the authors start at 1.0).

    Args:
        X: (n, d) points (n >= 1); y: (n,) values.
        restarts: sklearn's ``n_restarts_optimizer`` (authors: 20; spec default 2 for CPU).
        seed: sklearn's ``random_state`` for the restart draws (taken modulo 2^32).
        noise: sklearn's ``alpha``.
    Raises:
        ValueError: mismatched shapes or no points.
    """
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import Matern

    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"fit_gp needs (n, d) points and (n,) values, n >= 1 (got {tuple(X.shape)}, "
                         f"{tuple(y.shape)})")
    y_min, y_max = float(y.min()), float(y.max())
    span = y_max - y_min if y_max > y_min else 1.0
    yt = ((y - y_min) / span).numpy()
    gp = GaussianProcessRegressor(kernel=Matern(length_scale=initial_lengthscale(X), nu=2.5), alpha=noise,
                                  normalize_y=False,
                                  n_restarts_optimizer=int(restarts), random_state=int(seed) % 2**32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the length-scale bounds: expected, not an error
        gp.fit(X.numpy(), yt)
    lengthscale = float(np.asarray(gp.kernel_.length_scale).reshape(-1)[0])
    return GPSurrogate(X=X.clone(), alpha=torch.as_tensor(np.asarray(gp.alpha_).reshape(-1), dtype=torch.float64),
                       lengthscale=lengthscale, y_min=y_min, span=span, noise=noise)
