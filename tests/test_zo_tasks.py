"""The zeroth-order task families (fedsim.zo.tasks): values against independent computations, closed forms,
determinism, the per-process cache, and the validation errors (spec algorithms-more.md §11.7)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fedsim.errors import ScenarioError
from fedsim.zo.spec import ZerothOrderSpec, ZOTask
from fedsim.zo.tasks import TASKS, build_objective, check_task


def _spec(**task: object) -> ZerothOrderSpec:
    return ZerothOrderSpec(task=ZOTask(**task))


# ---------------------------------------------------------------- quadratic


def _quadratic_by_loop(x: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> float:
    """f_i by a plain Python loop over coordinates (the authors' formula, spec §11.7)."""
    d = len(x)
    total = 1.0
    for j in range(d):
        p = min(max(x[j], 0.0), 1.0) / 1.0 * 20.0 - 10.0
        total += c1[j] * p * p + c2[j] * p
    return 0.1 / d * total


def test_quadratic_values_match_a_loop_and_coefficients_follow_the_dirichlet_rule() -> None:
    obj = build_objective(_spec(family="quadratic", dim=7, heterogeneity=0.5), 3, seed=5)
    assert obj.dim == 7 and len(obj.clients) == 3 and obj.weights == [1 / 3] * 3
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.2, 1.2, size=(4, 7))  # outside the box too: clipped first
    for f in obj.clients:
        c1, c2 = f.c1, f.c2
        out = f(torch.from_numpy(pts))
        assert out.dtype == torch.float64 and out.shape == (4,)
        for k in range(4):
            assert float(out[k]) == pytest.approx(_quadratic_by_loop(pts[k], c1, c2), rel=1e-12)
    # 1 + div * (D - 1/N): each coordinate's coefficients average to 1 over clients and lie in [1 - div/N, ...]
    c1s = np.stack([f.c1 for f in obj.clients])
    np.testing.assert_allclose(c1s.mean(axis=0), 1.0, atol=1e-12)
    assert (c1s >= 1 - 0.5 / 3 - 1e-12).all() and (c1s <= 1 + 0.5 * (1 - 1 / 3) + 1e-12).all()


def test_quadratic_closed_form_minimiser_beats_random_points() -> None:
    obj = build_objective(_spec(family="quadratic", dim=20, heterogeneity=0.9), 5, seed=1)
    x_star = torch.full((20,), 0.475, dtype=torch.float64)  # p = -0.5 in every coordinate
    f_star = obj.value(x_star)
    assert f_star == pytest.approx(0.1 / 20 - 0.025, abs=1e-12)
    assert f_star == pytest.approx(obj.truth["global_minimum"], abs=1e-12)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        x = torch.rand(20, generator=gen, dtype=torch.float64)
        assert obj.value(x) > f_star
    # and nudging one coordinate either way from the minimiser raises F (a minimum, not a saddle)
    for j in (0, 19):
        for step in (-1e-3, 1e-3):
            moved = x_star.clone()
            moved[j] += step
            assert obj.value(moved) > f_star


def test_quadratic_zero_heterogeneity_gives_identical_clients() -> None:
    obj = build_objective(_spec(family="quadratic", dim=9, heterogeneity=0.0), 4, seed=2)
    pts = torch.rand(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = obj.clients[0](pts)
    for f in obj.clients[1:]:
        assert torch.equal(f(pts), first)
    hetero = build_objective(_spec(family="quadratic", dim=9, heterogeneity=0.5), 4, seed=2)
    assert not torch.equal(hetero.clients[0](pts), hetero.clients[1](pts))


def test_quadratic_default_dim_x0_and_seed_determinism() -> None:
    a = build_objective(_spec(family="quadratic"), 5, seed=11)
    assert a.dim == 300 and a.x0.shape == (300,) and a.x0.dtype == torch.float64
    assert 0 <= float(a.x0.min()) and float(a.x0.max()) <= 1
    b = build_objective(_spec(family="quadratic"), 5, seed=11)
    c = build_objective(_spec(family="quadratic"), 5, seed=12)
    assert torch.equal(a.x0, b.x0) and not torch.equal(a.x0, c.x0)
    assert a.value(a.x0) == b.value(b.x0) != c.value(a.x0)


# ---------------------------------------------------------------- registry, cache, pickling


def test_registry_lists_the_families() -> None:
    assert "quadratic" in TASKS
    assert TASKS.get("quadratic").build is not None


def test_build_returns_an_independent_copy_and_clients_pickle() -> None:
    spec = _spec(family="quadratic", dim=5)
    a = build_objective(spec, 2, seed=0)
    a.x0.add_(1.0)
    a.truth["global_minimum"] = "changed"
    b = build_objective(spec, 2, seed=0)
    assert float(b.x0.max()) <= 1.0 and b.truth["global_minimum"] != "changed"
    pts = torch.rand(3, 5, dtype=torch.float64)
    clone = pickle.loads(pickle.dumps(b.clients[1]))
    assert torch.equal(clone(pts), b.clients[1](pts))


def test_quadratic_refuses_fields_it_does_not_read() -> None:
    for field, value in (("dataset", "digits"), ("class_portion", 0.5), ("metric", "f1"), ("box", 0.1),
                         ("image_index", 0)):
        with pytest.raises(ScenarioError) as info:
            check_task(_spec(family="quadratic", **{field: value}), 3)
        assert info.value.path == f"task.{field}"
    check_task(_spec(family="quadratic", dim=4, heterogeneity=1.0), 3)  # what it reads is fine
