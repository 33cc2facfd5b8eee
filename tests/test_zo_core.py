"""The zeroth-order numerical core (fedsim.zo.{gp,rff,estimators,querylog,client,aggregate}) against independent
references: sklearn's GP and Ridge, finite differences, brute-force kernel derivatives, torch.optim.Adam, closed
forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.zo.aggregate import accept, global_value, next_point, radii, server_payload
from fedsim.zo.api import RFFMessage
from fedsim.zo.client import ZOClient, adam_step
from fedsim.zo.estimators import orthonormal_directions, rgf_gradient
from fedsim.zo.gp import fit_gp, grad_variance
from fedsim.zo.rff import RFFBasis, aggregate, fit_weights, surrogate_grad, surrogate_value
from fedsim.zo.spec import ZerothOrderSpec

D = torch.float64


def _data(n: int, d: int, seed: int = 0, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = 0.5 + spread * (torch.rand(n, d, generator=g, dtype=D) - 0.5)
    y = ((X - 0.3) ** 2).sum(1) + torch.sin(4 * X[:, 0]) + 3.0
    return X, y


def _sk_gp(X: torch.Tensor, y: torch.Tensor, restarts: int, seed: int, start: float | None = None):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import Matern

    lo, hi = float(y.min()), float(y.max())
    start = float(torch.pdist(X).median()) if start is None else start
    gp = GaussianProcessRegressor(kernel=Matern(length_scale=start, nu=2.5), alpha=1e-6,
                                  n_restarts_optimizer=restarts, random_state=seed)
    gp.fit(X.numpy(), ((y - lo) / (hi - lo)).numpy())
    return gp, (lambda P: gp.predict(np.atleast_2d(P)) * (hi - lo) + lo)


# ------------------------------------------------------------------------------------------------ GP
def test_gp_mean_equals_sklearn_predict_and_grad_equals_its_finite_differences() -> None:
    X, y = _data(40, 4)
    gp = fit_gp(X, y, restarts=1, seed=3)
    sk, predict = _sk_gp(X, y, restarts=1, seed=3)
    assert gp.lengthscale == pytest.approx(float(sk.kernel_.length_scale), rel=1e-12)
    P, _ = _data(7, 4, seed=1)
    assert torch.allclose(gp.mean(P), torch.as_tensor(predict(P.numpy())), rtol=0, atol=1e-9)
    h = 1e-5
    for x in (P[0], X[5]):  # a free point and a training point (where |x - x_j| = 0)
        fd = np.array([(predict(x.numpy() + h * e) - predict(x.numpy() - h * e))[0] / (2 * h) for e in np.eye(4)])
        g = gp.grad(x).numpy()
        assert np.all(np.isfinite(g))
        assert np.allclose(g, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max()), (g, fd)


def test_gp_length_scale_does_not_collapse_on_a_tight_cluster_with_few_restarts() -> None:
    """FZooS's first fit: n_inits points in x0 +- 0.01. From sklearn's default start (1.0) the optimiser lands on
    the lower bound 1e-5 unless given ~20 restarts, and the mean's gradient is then exactly 0 (FZooS stalls)."""
    g = torch.Generator().manual_seed(0)
    X = 0.5 + 0.01 * (2 * torch.rand(11, 8, generator=g, dtype=D) - 1)
    y = ((X - torch.linspace(0.25, 0.75, 8, dtype=D)) ** 2).sum(1)
    many, _ = _sk_gp(X, y, restarts=20, seed=0, start=1.0)  # the authors' setting, as reference
    lml = many.log_marginal_likelihood_value_
    gp = fit_gp(X, y, restarts=0, seed=0)
    yt = ((y - y.min()) / (y.max() - y.min())).numpy()
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import Matern
    ours = GaussianProcessRegressor(Matern(nu=2.5), alpha=1e-6).fit(X.numpy(), yt)
    assert ours.log_marginal_likelihood(np.log([gp.lengthscale])) >= lml - 1e-3
    assert gp.lengthscale > 1e-3 and gp.grad(X[0]).abs().max() > 0


def test_grad_variance_equals_brute_force_kernel_derivatives() -> None:
    """Reference: sklearn's Matern kernel differentiated by central finite differences (J and the prior term),
    and a dense inverse; no code of fedsim.zo.gp."""
    from sklearn.gaussian_process.kernels import Matern

    d, ls = 3, 0.4
    base, _ = _data(12, d, seed=2)
    xs, _ = _data(4, d, seed=5)
    k = Matern(length_scale=ls, nu=2.5)

    def kk(a: np.ndarray, b: np.ndarray) -> float:
        return float(k(a.reshape(1, -1), b.reshape(1, -1))[0, 0])

    B = base.numpy()
    Kinv = np.linalg.inv(k(B) + 1e-6 * np.eye(len(B)))
    h, E = 1e-4, np.eye(d)
    want = []
    for x in xs.numpy():
        J = np.array([[(kk(x + h * e, b) - kk(x - h * e, b)) / (2 * h) for e in E] for b in B])  # (n, d)
        prior = sum((kk(x + h * e, x + h * e) - kk(x + h * e, x - h * e) - kk(x - h * e, x + h * e)
                     + kk(x - h * e, x - h * e)) / (4 * h * h) for e in E)
        want.append(prior - np.trace(J.T @ Kinv @ J))
    got = grad_variance(base, xs, ls).numpy()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * abs(max(want))), (got, want)
    # the variance base must be the CONCATENATION of the GP's points and the new point (spec 11.8: the authors'
    # `xs + [x]` shifted every point by x): a point queried next to a candidate lowers that candidate's variance
    X, y = _data(30, d, seed=4)
    gp = fit_gp(X, y, restarts=0, seed=0)
    near = xs[:1] + 0.02
    with_extra = gp.grad_variance(xs, extra=near)
    without = gp.grad_variance(xs)
    assert torch.allclose(with_extra, gp.span**2 * grad_variance(torch.cat([X, near]), xs, gp.lengthscale))
    assert with_extra[0] < 0.9 * without[0]
    assert not torch.allclose(with_extra, gp.span**2 * grad_variance(X + near, xs, gp.lengthscale), rtol=1e-3)


# ------------------------------------------------------------------------------------------------ RFF
def test_rff_features_approximate_the_rbf_kernel_and_are_shared_by_seed() -> None:
    ls = 0.7
    basis = RFFBasis(3, 100_000, ls, seed=11)
    P, _ = _data(5, 3, seed=3, spread=1.0)
    K = torch.exp(-torch.cdist(P, P) ** 2 / (2 * ls**2))
    err = (basis.phi(P) @ basis.phi(P).T - K).abs().max()
    assert err < 0.02, err
    assert torch.equal(RFFBasis(3, 50, ls, seed=11).bias, RFFBasis(3, 50, ls, seed=11).bias)
    assert not torch.equal(RFFBasis(3, 50, ls, seed=11).omega, RFFBasis(3, 50, ls, seed=12).omega)
    # Omega ~ N(0, l^-2) and b ~ U[0, 2 pi): sample moments
    assert abs(float(basis.omega.std()) - 1 / ls) < 0.01
    assert abs(float(basis.bias.mean()) - math.pi) < 0.03 and float(basis.bias.max()) > 2 * math.pi - 1e-3


def test_min_norm_fit_interpolates_and_ridge_matches_sklearn() -> None:
    from sklearn.linear_model import Ridge

    basis = RFFBasis(6, 3000, 1.0, seed=0)
    X, y = _data(25, 6, spread=1.0)
    msg = fit_weights(basis, X, y)
    assert (msg.y_min, msg.y_max) == (float(y.min()), float(y.max()))
    assert torch.allclose(surrogate_value(basis, msg, X), y, rtol=0, atol=1e-8 * float(y.abs().max()))
    yt = ((y - y.min()) / (y.max() - y.min())).numpy()
    ref = Ridge(alpha=0.3, fit_intercept=False).fit(basis.phi(X).numpy(), yt).coef_
    assert np.allclose(fit_weights(basis, X, y, ridge=0.3).nu.numpy(), ref, atol=1e-8)
    with pytest.raises(ValueError, match="generator"):
        fit_weights(basis, X, y, nu_noise=0.1)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = fit_weights(basis, X, y, y_noise=0.1, nu_noise=0.01, generator=g1)
    b = fit_weights(basis, X, y, y_noise=0.1, nu_noise=0.01, generator=g2)
    assert torch.equal(a.nu, b.nu) and not torch.allclose(a.nu, msg.nu, atol=1e-3)


def test_rff_closed_form_gradient_equals_autograd_and_aggregate_is_the_weighted_sum() -> None:
    basis = RFFBasis(5, 800, 1.0, seed=4)
    msgs = []
    for i in range(3):
        X, y = _data(20, 5, seed=10 + i)
        msgs.append(fit_weights(basis, X, y * (i + 1)))
    w = [0.2, 0.5, 0.3]
    glob = aggregate(msgs, w)
    P, _ = _data(6, 5, seed=99)
    want = sum(wi * surrogate_value(basis, m, P) for wi, m in zip(w, msgs, strict=True))
    assert torch.allclose(surrogate_value(basis, glob, P), want, atol=1e-10)
    for s in (msgs[1], glob):
        x = P[0].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(surrogate_value(basis, s, x.unsqueeze(0)).sum(), x)
        assert torch.allclose(surrogate_grad(basis, s, P[0]), g, atol=1e-10)


# ------------------------------------------------------------------------------------------------ estimators
def test_rgf_on_a_linear_function_is_the_projection_and_directions_are_gram_schmidt() -> None:
    d, q, mu = 12, 5, 0.01
    a = torch.linspace(-1, 2, d, dtype=D)

    def f(P: torch.Tensor) -> torch.Tensor:
        return P @ a + 0.7

    x = torch.full((d,), 0.4, dtype=D)
    g, n = rgf_gradient(f, x, directions=q, mu=mu, generator=torch.Generator().manual_seed(3))
    assert n == q + 1
    _, n2 = rgf_gradient(f, x, directions=q, mu=mu, generator=torch.Generator().manual_seed(3), fx=0.0)
    assert n2 == q
    # independent: classical Gram-Schmidt on the same Gaussian draws
    raw = torch.randn(q, d, generator=torch.Generator().manual_seed(3), dtype=D)
    U = []
    for u in raw:
        for o in U:
            u = u - (u @ o) * o
        U.append(u / u.norm())
    U = torch.stack(U)
    assert torch.allclose(orthonormal_directions(d, q, torch.Generator().manual_seed(3)), U, atol=1e-12)
    assert torch.allclose(g, (U.T @ U @ a) / q, atol=1e-9)
    with pytest.raises(ValueError, match="directions"):
        orthonormal_directions(3, 4, torch.Generator())


def test_adam_step_equals_torch_adam() -> None:
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=D)
    p = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    x, m, v = x0.clone(), torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    for t in range(1, 6):
        grad = torch.sin(3 * x) + t
        p.grad = grad.clone()
        opt.step()
        x = adam_step(x, grad, m, v, t, 0.05)
        assert torch.allclose(x, p.detach(), atol=1e-14)


# ------------------------------------------------------------------------------------------------ client
DIM = 8
CENTRE = torch.linspace(0.25, 0.75, DIM, dtype=D)


def _quad(P: torch.Tensor) -> torch.Tensor:
    return ((P - CENTRE) ** 2).sum(1)


def _spec(method: str = "fzoos", **kw) -> ZerothOrderSpec:
    fz = {"rff_features": 500, "gp_restarts": 0, "gp_points": 60, "rff_points": 100, "refresh_top": 10,
          "refresh_candidates": 40, "explore_candidates": 30}
    return ZerothOrderSpec(method=method, local_iters=kw.pop("local_iters", 4), lr=kw.pop("lr", 0.05),
                           fzoos=fz, rgf={"directions": 5}, **kw)


X0 = torch.full((DIM,), 0.5, dtype=D)


def test_fzoos_local_steps_descend_a_convex_quadratic_and_are_deterministic() -> None:
    f0 = float(_quad(X0[None])[0])
    runs = [ZOClient(_quad, _spec(), seed=s, partition_id=1, dim=DIM).train(1, X0, {})[0] for s in (7, 7, 8)]
    assert float(_quad(runs[0][None])[0]) < 0.7 * f0  # Adam at lr 0.05 x 4 steps: ~0.17 per coordinate
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # a different partition id draws differently too (per-client generators)
    other = ZOClient(_quad, _spec(), seed=7, partition_id=2, dim=DIM).train(1, X0, {})[0]
    assert not torch.equal(runs[0], other)


def _roundtrip(state: dict) -> dict:
    """As Flower would persist it: tensors through numpy, strings as they are."""
    return {k: v if isinstance(v, str) else torch.from_numpy(v.numpy().copy()) for k, v in state.items()}


@pytest.mark.parametrize("method", ["fzoos", "fedprox", "scaffold1", "scaffold2"])
def test_state_round_trip_gives_identical_next_round(method: str) -> None:
    spec = _spec(method)
    a = ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM)
    x1, reply = a.train(1, X0, {})
    x_next = (x1 + X0) / 2
    payload: dict[str, torch.Tensor] = {}
    if method == "fzoos":  # the refresh runs in a later ClientApp call than the training: restore in between
        mid = ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM, state=_roundtrip(a.state()))
        msg = a.refresh(1, x_next, 0.02)
        assert torch.equal(mid.refresh(1, x_next, 0.02).nu, msg.nu)
        payload = server_payload(method, surrogate=aggregate([msg], [1.0]))
    elif method == "scaffold1":
        payload = server_payload(method, controls=[a.control_variate(1, x_next)], weights=[1.0])
    elif method == "scaffold2":
        payload = server_payload(method, controls=[reply["c_i"] * 0.5], weights=[1.0])
    b = ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM, state=_roundtrip(a.state()))
    assert b.gp_lengthscale == a.gp_lengthscale and b.queries == a.queries and torch.equal(b.log.X, a.log.X)
    assert (b.c_i is None) == (a.c_i is None) and (b.own is None) == (a.own is None)
    xa, ra = a.train(2, x_next, payload)
    xb, rb = b.train(2, x_next, payload)
    assert torch.equal(xa, xb) and a.queries == b.queries and ra.keys() == rb.keys()
    with pytest.raises(ValueError, match="method"):
        ZOClient(_quad, _spec("fedzo"), seed=5, partition_id=0, dim=DIM, state=a.state())


def test_fzoos_correction_is_used_and_vanishes_when_global_equals_own() -> None:
    spec = _spec()
    a = ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM)
    x1, _ = a.train(1, X0, {})
    own = a.refresh(1, x1, 0.02)
    st = a.state()

    def next_x(payload: dict) -> torch.Tensor:
        return ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM, state=st).train(2, x1, payload)[0]

    plain = next_x({})
    assert torch.equal(next_x(server_payload("fzoos", surrogate=aggregate([own], [1.0]))), plain)
    other = RFFMessage(nu=own.nu.flip(0), y_min=own.y_min, y_max=own.y_max + 5.0)
    assert not torch.allclose(next_x(server_payload("fzoos", surrogate=aggregate([other], [1.0]))), plain)
    with pytest.raises(ValueError, match="surrogate of its own"):
        ZOClient(_quad, spec, seed=5, partition_id=0, dim=DIM).train(1, X0, {"nu": own.nu, "offset": torch.tensor(0.)})


def test_query_counts_follow_the_spec_formula() -> None:
    spec = _spec(local_iters=4)
    T, top, fz = 4, spec.fzoos.explore_top, spec.fzoos
    c = ZOClient(_quad, spec, seed=1, partition_id=0, dim=DIM)
    x1, _ = c.train(1, X0, {})
    assert c.queries == {"init": fz.n_inits, "train": 1 + T + top * (T - 1), "refresh": 0, "values": 0}
    assert len(c.log) == fz.n_inits + 1 + T + top * (T - 1)  # every query recorded: no point repeated
    x_next = (x1 + X0) / 2
    assert c.values(torch.stack([X0, x_next])).shape == (2,)
    assert c.queries["values"] == 1  # X0 was queried in training: answered from the record
    c.refresh(1, x_next, 0.02)
    assert c.queries["refresh"] == fz.refresh_top  # x_next known from the safeguard reply
    c.refresh(2, torch.full((DIM,), 0.1, dtype=D), 0.02)
    assert c.queries["refresh"] == 2 * fz.refresh_top + 1
    # the ClientApp's round 0 (initial exploration + the safeguard's f_i(x0)) then round 1 = round 1 alone
    early = ZOClient(_quad, spec, seed=1, partition_id=0, dim=DIM)
    early.initialize(X0)
    early.values(X0[None])
    early.initialize(X0)  # once only
    assert torch.equal(early.train(1, X0, {})[0], x1)
    assert early.queries == {"init": fz.n_inits, "train": T + top * (T - 1), "refresh": 0, "values": 1}
    q = spec.rgf.directions
    for method in ("fedzo", "scaffold1"):
        r = ZOClient(_quad, _spec(method, local_iters=T), seed=1, partition_id=0, dim=DIM)
        y1, _ = r.train(1, X0, {})
        assert r.queries["train"] == T * (q + 1)
        if method == "scaffold1":
            r.control_variate(1, y1 * 0.9)
            assert r.queries["refresh"] == q + 1


# ------------------------------------------------------------------------------------------------ server
def test_server_math_by_brute_force() -> None:
    x_r = torch.tensor([0.5, 0.5, 0.5], dtype=D)
    locs = [torch.tensor([0.1, 0.5, 0.9], dtype=D), torch.tensor([0.7, 0.2, 0.5], dtype=D)]
    w = [0.25, 0.75]
    avg = 0.25 * locs[0] + 0.75 * locs[1]
    assert torch.allclose(next_point(x_r, locs, w, 1.0), avg, atol=1e-15)
    assert torch.allclose(next_point(x_r, locs, w, 0.5), (x_r + avg) / 2, atol=1e-15)
    assert torch.allclose(next_point(x_r, locs, w, 10.0), (x_r - 10 * (x_r - avg)).clamp(0, 1), atol=1e-15)
    assert radii(avg, locs) == pytest.approx([float((avg - x).abs().sum()) / 6 for x in locs])
    assert global_value([1.0, 3.0], w) == pytest.approx(2.5)
    assert accept(2.0, 1.0) and not accept(2.0, 2.0)
    c = server_payload("scaffold2", controls=[torch.ones(3, dtype=D), 3 * torch.ones(3, dtype=D)], weights=w)["c"]
    assert torch.allclose(c, torch.full((3,), 2.5, dtype=D))
    assert server_payload("fzoos") == {} and server_payload("fedzo") == {}
    with pytest.raises(ValueError):
        next_point(x_r, locs, [1.0], 1.0)
    assert math.isfinite(radii(x_r, [x_r])[0])


def _client_hash() -> str:
    """A digest of one FZooS round (x_i and nu_i) at d = 200, where the BLAS paths are multi-threaded."""
    import hashlib

    d = 200
    c = torch.linspace(0.1, 0.9, d, dtype=D)
    cl = ZOClient(lambda X: ((X - c) ** 2).sum(1), ZerothOrderSpec(local_iters=2, fzoos={"rff_features": 2000}),
                  seed=1, partition_id=0, dim=d)
    x, _ = cl.train(1, torch.full((d,), 0.5, dtype=D), {})
    nu = cl.refresh(1, x, 0.01).nu
    return hashlib.sha256(x.numpy().tobytes() + nu.numpy().tobytes()).hexdigest()


def test_client_numbers_do_not_depend_on_the_thread_count() -> None:
    """A Ray actor and the in-process driver may run with different thread counts: x_i and nu_i must agree to
    the bit (at 1 vs 2 threads they differed before the client procedures were pinned to one thread)."""
    import os
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve()
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here.parent.parent)!r}]; import torch; "
            "torch.set_num_threads(2); import test_zo_core as t; print(t._client_hash())")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=here.parent.parent)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mine = _client_hash()
    finally:
        torch.set_num_threads(before)
    assert mine == res.stdout.strip().splitlines()[-1]
