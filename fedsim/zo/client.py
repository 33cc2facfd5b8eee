"""One zeroth-order client's procedures for every method of ``spec.ZO_METHODS`` (spec §11.4, §11.5, §11.7), with
no Flower code: the ClientApp builds a :class:`ZOClient` from its persisted :meth:`ZOClient.state` each message.

Methods (the authors' ``--zo_opt`` / ``--correction`` combinations):

* ``fzoos`` (``fzoos`` + ``rff``): T Adam steps on ``g_t = grad mu_i^GP(x) + gamma_t (grad mu^RFF(x) -
  grad mu_i^RFF(x))`` (the correction from round 2, once a global surrogate exists), then a surrogate refresh.
* ``fedzo`` (``rgf`` + ``none``): T Adam steps on the RGF estimate.
* ``fedprox`` (``rgf`` + ``prox``): RGF + ``prox_mu (x - x_r)``. Choice: applied from round 1 (FedProx's
  definition; the authors' code skips it in round 1 only because its correction hook is unset then).
* ``scaffold1`` (``rgf`` + ``diff``): RGF + ``(c - c_i)``, ``c_i`` a fresh RGF estimate at the broadcast point
  computed in the second exchange (:meth:`ZOClient.control_variate`, its queries counted under ``refresh``) and
  ``c = sum_j w_j c_j`` sent by the server the next round (the authors have the server call the clients'
  estimators after aggregating; the same two-exchange flow).
* ``scaffold2`` (``rgf`` + ``scaf``): RGF + ``(c - c_i)``, ``c_i`` the mean of the client's uncorrected estimates
  of the previous round (sent in the phase-1 reply as ``"c_i"``).

The baselines' correction has weight 1 (the authors'); only FZooS has gamma. Adam (optax defaults: b1 0.9,
b2 0.999, eps 1e-8) restarts every round; every iterate is clipped to [0, 1]^d. Fixes of the authors' bugs
(spec §11.8): the variance base set is the GP's points plus the new iterate concatenated (``xs + [x]`` was a
broadcast shift), GP gradients are analytic, and every random draw comes from
``fedsim.seeding.torch_generator(seed, "zo", <phase>, round, partition_id)``.

Queries (a recorded point is never queried twice: :mod:`fedsim.zo.querylog`); with no repeats:
``init`` n_inits once (FZooS); FZooS ``train`` ``1 + T + explore_top (T - 1)`` (the start point, one per step,
explore_top per step but the last: "6 per iteration except the last"); ``refresh`` ``1 + refresh_top``; RGF
``train`` ``T (q + 1)`` (each step's base value and q probes; the base of step t+1 is the iterate queried after step
t; the final iterate is not queried); scaffold1 ``refresh`` ``q + 1``; ``values`` one per new point.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from fedsim.seeding import derive_seed, torch_generator
from fedsim.zo.adam import adam_step
from fedsim.zo.api import ClientFunction, RFFMessage
from fedsim.zo.estimators import rgf_gradient
from fedsim.zo.gp import fit_gp, grad_variance
from fedsim.zo.querylog import PHASES, QueryLog
from fedsim.zo.rff import fit_weights, shared_basis
from fedsim.zo.spec import ZerothOrderSpec
from fedsim.zo.tasks.base import one_thread

_KEEP_RGF = 8  # points the finite-difference baselines remember (the broadcast point, recent iterates)
_F = TypeVar("_F", bound=Callable)


def _single_threaded(fn: _F) -> _F:
    """Run a client procedure on one BLAS / torch thread: sklearn's length-scale fit, the Cholesky / lstsq and
    matmul reductions otherwise round differently with the thread count (measured: a different x_i and nu_i
    at 1 vs 2 threads), so a Ray actor and the in-process driver would drift apart."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        with one_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _box(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


class ZOClient:
    """Client ``partition_id``'s side of a zeroth-order federation.

    Args:
        f: its private black box ``(n, d) -> (n,)``.
        spec: the ``zeroth_order`` scenario block.
        seed: the scenario seed (also the seed of the shared RFF basis).
        partition_id: the client's id.
        dim: d.
        state: a dict from :meth:`state` to resume from (None: a fresh client).
    Raises:
        ValueError: a state of another method or dimension.
    """

    def __init__(self, f: ClientFunction, spec: ZerothOrderSpec, *, seed: int, partition_id: int, dim: int,
                 state: dict[str, Tensor | str] | None = None) -> None:
        self.spec, self.seed, self.pid, self.dim = spec, int(seed), int(partition_id), int(dim)
        self.method = spec.method
        state = dict(state or {})
        if state and state.get("method") != self.method:
            raise ValueError(f"client state of method {state.get('method')!r} given to a {self.method} client")
        keep = None if self.method == "fzoos" else _KEEP_RGF
        self.log = QueryLog(f, self.dim, keep=keep, X=state.get("X"), y=state.get("y"),  # type: ignore[arg-type]
                            counts=state.get("counts"))  # type: ignore[arg-type]
        self.own: RFFMessage | None = None
        if "nu" in state:
            self.own = RFFMessage(nu=state["nu"].clone(), y_min=float(state["y_min"]),  # type: ignore[union-attr]
                                  y_max=float(state["y_max"]))  # type: ignore[arg-type]
        self.c_i: Tensor | None = state["c_i"].clone() if "c_i" in state else None  # type: ignore[union-attr]
        ls = state.get("gp_lengthscale")
        self.gp_lengthscale: float | None = None if ls is None else float(ls)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- bookkeeping
    @property
    def queries(self) -> dict[str, int]:
        """Cumulative queries per phase (:data:`fedsim.zo.querylog.PHASES`)."""
        return dict(self.log.counts)

    def state(self) -> dict[str, Tensor | str]:
        """Everything the next round needs, as tensors and strings (for Flower's ``context.state``)."""
        out: dict[str, Tensor | str] = {"method": self.method, **self.log.state()}
        if self.own is not None:
            out.update(nu=self.own.nu.clone(), y_min=torch.tensor(self.own.y_min, dtype=torch.float64),
                       y_max=torch.tensor(self.own.y_max, dtype=torch.float64))
        if self.c_i is not None:
            out["c_i"] = self.c_i.clone()
        if self.gp_lengthscale is not None:
            out["gp_lengthscale"] = torch.tensor(self.gp_lengthscale, dtype=torch.float64)
        return out

    def _gen(self, phase: str, rnd: int) -> torch.Generator:
        return torch_generator(self.seed, "zo", phase, rnd, self.pid)

    def _point(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise ValueError(f"client {self.pid}: point of dimension {x.shape[0]}, expected {self.dim}")
        return _box(x).contiguous()

    def _gamma(self, t: int) -> float:
        g = self.spec.fzoos.gamma
        return 1.0 / (t + 1) if g == "decay" else float(g)

    @_single_threaded
    def initialize(self, x0: Tensor) -> None:
        """FZooS's initial exploration (spec §11.5): ``n_inits`` uniform queries in ``x0 +- explore_radius``
        (clipped), counted under ``init``, from ``torch_generator(seed, "zo", "init", 0, partition_id)``. Done once
        (later calls, and calls on a baseline client, do nothing); ``train`` calls it, so calling it earlier (e.g.
        with the round-0 safeguard query at x0) is optional and gives the same draws."""
        if self.method != "fzoos" or self.log.counts["init"] > 0:
            return
        cfg = self.spec.fzoos
        u = torch.rand(cfg.n_inits, self.dim, generator=self._gen("init", 0), dtype=torch.float64)
        self.log.query(_box(self._point(x0) + cfg.explore_radius * (2 * u - 1)), "init")

    # ----------------------------------------------------------------- phase 1: local training
    @_single_threaded
    def train(self, rnd: int, x_r: Tensor,
              payload: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """T local steps from the broadcast point (spec §11.4, §11.5).

        Args:
            rnd: the round (1-based).
            x_r: (d,) the broadcast point.
            payload: the server's extras: fzoos ``{"nu": (M,), "offset": ()}`` (the global surrogate, from round 2),
                scaffold1/2 ``{"c": (d,)}``; empty in round 1 and for fedzo/fedprox.
        Returns:
            ``(x_i, reply)``: the local iterate (d,) and the reply extras (scaffold2: ``{"c_i": (d,)}``; else {}).
        Raises:
            ValueError: a payload this client cannot use (e.g. a global surrogate but no surrogate of its own).
        """
        x_r = self._point(x_r)
        payload = payload or {}
        if self.method == "fzoos":
            return self._train_fzoos(rnd, x_r, payload), {}
        return self._train_rgf(rnd, x_r, payload)

    def _train_fzoos(self, rnd: int, x_r: Tensor, payload: dict[str, Tensor]) -> Tensor:
        cfg = self.spec.fzoos
        self.initialize(x_r)  # a no-op unless this is the client's first round
        correction = None
        if "nu" in payload:
            if self.own is None:
                raise ValueError(f"client {self.pid}: got a global surrogate but has sent no surrogate of its own")
            basis = shared_basis(self.dim, cfg.rff_features, cfg.rff_lengthscale, self.seed)
            # grad mu^RFF - grad mu_i^RFF = grad of phi(x) @ (nu - (y_max,i - y_min,i) nu_i): one projection
            correction = (basis, payload["nu"].to(torch.float64) - (self.own.y_max - self.own.y_min) * self.own.nu)
        gen = self._gen("train", rnd)
        self.log.query(x_r.unsqueeze(0), "train")
        x, m, v = x_r.clone(), torch.zeros_like(x_r), torch.zeros_like(x_r)
        T = self.spec.local_iters
        for t in range(T):
            Xn, yn = self.log.nearest(x, cfg.gp_points)
            gp = fit_gp(Xn, yn, restarts=cfg.gp_restarts, seed=derive_seed(self.seed, "zo", "gp", rnd, self.pid, t))
            self.gp_lengthscale = gp.lengthscale
            g = gp.grad(x)
            if correction is not None:
                basis, w = correction
                g = g + self._gamma(t) * basis.grad_project(x, w)
            x = _box(adam_step(x, g, m, v, t + 1, self.spec.lr)).contiguous()
            self.log.query(x.unsqueeze(0), "train")
            if t < T - 1 and cfg.explore_top > 0:
                u = torch.rand(cfg.explore_candidates, self.dim, generator=gen, dtype=torch.float64)
                cand = _box(x + cfg.explore_radius * (2 * u - 1))
                var = gp.grad_variance(cand, extra=x.unsqueeze(0))  # base: the GP's points + x (spec §11.8 fix)
                top = torch.argsort(var, descending=True, stable=True)[: cfg.explore_top]
                self.log.query(cand[top], "train")
        return x

    def _train_rgf(self, rnd: int, x_r: Tensor, payload: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        rgf = self.spec.rgf
        shift = None
        if self.method in ("scaffold1", "scaffold2") and "c" in payload:
            if self.c_i is None:
                raise ValueError(f"client {self.pid}: got a global control variate but has none of its own")
            shift = payload["c"].to(torch.float64) - self.c_i
        gen = self._gen("train", rnd)

        def probe(pts: Tensor) -> Tensor:
            return self.log.evaluate(pts, "train")

        fx = float(self.log.query(x_r.unsqueeze(0), "train")[0])
        x, m, v = x_r.clone(), torch.zeros_like(x_r), torch.zeros_like(x_r)
        total = torch.zeros_like(x_r)
        T = self.spec.local_iters
        for t in range(T):
            g, _ = rgf_gradient(probe, x, directions=rgf.directions, mu=rgf.mu, generator=gen, fx=fx)
            total += g
            if self.method == "fedprox":
                g = g + self.spec.prox_mu * (x - x_r)
            elif shift is not None:
                g = g + shift
            x = _box(adam_step(x, g, m, v, t + 1, self.spec.lr)).contiguous()
            if t < T - 1:
                fx = float(self.log.query(x.unsqueeze(0), "train")[0])
        if self.method == "scaffold2":
            self.c_i = total / T
            return x, {"c_i": self.c_i.clone()}
        return x, {}

    # ----------------------------------------------------------------- phase 2: refresh at x_{r+1}
    @_single_threaded
    def refresh(self, rnd: int, x_next: Tensor, radius: float) -> RFFMessage:
        """FZooS's surrogate refresh at the new global point (spec §11.5, §11.6 step 4): query ``x_next``, pick
        ``refresh_top`` of ``refresh_candidates`` uniform candidates in ``x_next +- radius`` by gradient variance
        (base: the ``gp_points`` recorded points nearest ``x_next``; Matern kernel with the last fitted length-scale),
        query them, and fit the RFF weights on the ``rff_points`` nearest, with the message defenses
        (noise from ``torch_generator(seed, "zo", "defense", round, partition_id)``).

        A radius <= 0 (the client did not move) falls back to ``explore_radius`` (the authors' code would query
        ``refresh_top`` copies of ``x_next``). The returned message is kept as the client's own for the next
        round's correction.
        """
        if self.method != "fzoos":
            raise ValueError(f"refresh is FZooS's second exchange; {self.method} has none")
        cfg, dfn = self.spec.fzoos, self.spec.defenses
        x = self._point(x_next)
        self.log.query(x.unsqueeze(0), "refresh")
        r = float(radius) if radius > 0 and math.isfinite(radius) else cfg.explore_radius
        if cfg.refresh_top > 0:
            u = torch.rand(cfg.refresh_candidates, self.dim, generator=self._gen("refresh", rnd), dtype=torch.float64)
            cand = _box(x + r * (2 * u - 1))
            base, _ = self.log.nearest(x, cfg.gp_points)
            ls = self.gp_lengthscale if self.gp_lengthscale is not None else cfg.rff_lengthscale
            var = grad_variance(base, cand, ls)
            top = torch.argsort(var, descending=True, stable=True)[: cfg.refresh_top]
            self.log.query(cand[top], "refresh")
        Xn, yn = self.log.nearest(x, cfg.rff_points)
        basis = shared_basis(self.dim, cfg.rff_features, cfg.rff_lengthscale, self.seed)
        noisy = dfn.y_noise > 0 or dfn.nu_noise > 0
        self.own = fit_weights(basis, Xn, yn, ridge=dfn.ridge, y_noise=dfn.y_noise, nu_noise=dfn.nu_noise,
                               generator=self._gen("defense", rnd) if noisy else None)
        return RFFMessage(nu=self.own.nu.clone(), y_min=self.own.y_min, y_max=self.own.y_max)

    @_single_threaded
    def control_variate(self, rnd: int, x_next: Tensor) -> Tensor:
        """SCAFFOLD type I's second exchange: a fresh RGF estimate ``c_i`` (d,) at the new global point (kept as the
        client's own for the next round; ``q + 1`` queries under ``refresh``, q when ``f(x_next)`` is recorded)."""
        if self.method != "scaffold1":
            raise ValueError(f"control_variate is scaffold1's second exchange; {self.method} has none")
        x = self._point(x_next)
        fx = float(self.log.query(x.unsqueeze(0), "refresh")[0])
        g, _ = rgf_gradient(lambda pts: self.log.evaluate(pts, "refresh"), x, directions=self.spec.rgf.directions,
                            mu=self.spec.rgf.mu, generator=self._gen("control", rnd), fx=fx)
        self.c_i = g
        return g.clone()

    # ----------------------------------------------------------------- safeguard
    @_single_threaded
    def values(self, xs: Tensor) -> Tensor:
        """The safeguard's extra message (spec §11.8): ``f_i`` at the server's points ``xs`` (k, d) -> (k,)
        (clipped to the box; counted under ``values`` unless already recorded)."""
        xs = _box(torch.as_tensor(xs, dtype=torch.float64).reshape(-1, self.dim)).contiguous()
        return self.log.query(xs, "values")


__all__ = ["PHASES", "ZOClient", "adam_step"]
