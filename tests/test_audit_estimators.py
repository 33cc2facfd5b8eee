"""fedsim.audit.estimators against independent values: Google's jax_privacy auditing code (a second implementation of
Steinke et al.'s p-value and bound), dp_accounting's Gaussian-mechanism calibration, closed forms (q^r for all-correct
guesses, Dong-Roth-Su Cor. 2.13 for mu-GDP), brute-force quadrature, and simulated mechanisms whose true epsilon is
known (Gaussian mechanism, randomized response, randomized response that reveals the coin with probability delta).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import norm

from fedsim.audit.estimators import guess_grid, one_run_lower_bound, one_run_p_value
from fedsim.audit.gaussian_fit import (
    GAUSSIAN_METHOD,
    POOLED_METHOD,
    gaussian_estimate,
    gaussian_pair_epsilon,
    gdp_epsilon,
    pooled_gaussian_estimate,
)

JAX_PRIVACY_HINT = "jax-privacy not installed: pip install -q --no-deps jax-privacy==2.0.0"
DELTA = 1e-5


@pytest.fixture(scope="module")
def jp():
    """jax_privacy/auditing.py loaded on its own (numpy/scipy/dp_accounting only): never `import jax_privacy`,
    whose __init__ needs jax."""
    spec = importlib.util.find_spec("jax_privacy")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(JAX_PRIVACY_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "auditing.py"
    if not path.is_file():
        pytest.skip(JAX_PRIVACY_HINT)
    mod_spec = importlib.util.spec_from_file_location("_jax_privacy_auditing", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # dataclasses look their module up
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(mod_spec.name, None)
    return module


def gdp_epsilon_brentq(mu: float, delta: float) -> float:
    """True epsilon of mu-GDP at delta: Dong, Roth, Su Cor. 2.13, solved for eps."""
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 500)


def gaussian_scores(seed: int, m: int, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """m canaries, coins 1/2, score ~ N(mu, 1) when in, N(0, 1) when out: a mu-GDP mechanism per canary."""
    rng = np.random.default_rng(seed)
    coins = rng.random(m) < 0.5
    scores = rng.normal(size=m) + mu * coins
    return scores[coins], scores[~coins]


def rr_scores(seed: int, m: int, eps: float, reveal: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Randomized response on each coin (eps-DP, tight), revealing the coin outright with probability ``reveal``
    ((eps, reveal)-DP), plus independent jitter (post-processing) so that no two scores tie."""
    rng = np.random.default_rng(seed)
    coins = rng.random(m) < 0.5
    bit = np.where(rng.random(m) < expit(eps), coins, ~coins)
    scores = bit + 0.5 * rng.random(m)
    scores = np.where(rng.random(m) < reveal, np.where(coins, 3.0, -3.0) + 0.1 * rng.random(m), scores)
    return scores[coins], scores[~coins]


# ------------------------------------------------------------------------------------------------ Steinke et al.
@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 200, 180, 1.0, 1e-5), (1000, 600, 600, 2.0, 1e-5),
                                             (500, 100, 70, 0.5, 1e-3), (500, 50, 50, 3.0, 0.0),
                                             (200, 200, 150, 0.8, 1e-2)])
def test_p_value_matches_jax_privacy(jp, m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(jp._one_run_p_value(m, r, v, eps, delta), rel=1e-9)


def test_p_value_closed_forms():
    q = expit(1.3)
    assert one_run_p_value(300, 40, 40, 1.3, 0.0) == pytest.approx(q**40, rel=1e-12)  # all correct: q^r
    assert one_run_p_value(300, 40, 0, 1.3, 1e-3) == 1.0
    assert one_run_p_value(300, 40, 30, 1.3, 1e-3) > one_run_p_value(300, 40, 30, 1.3, 0.0)  # the delta term
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        one_run_p_value(10, 20, 5, 1.0, 0.0)


# The documented grid (fedsim.audit.estimators: ONE_SIDED_FRACTIONS, TWO_SIDED_FRACTIONS), fixed before any score.
GRID_500 = [(10, 0), (25, 0), (50, 0), (100, 0), (150, 0), (250, 0),
            (25, 25), (50, 50), (100, 100), (150, 150), (200, 200), (250, 250)]


def test_guess_grid_is_a_function_of_m_only():
    assert guess_grid(500) == GRID_500
    assert len(guess_grid(1000)) == 12 and guess_grid(1000)[-1] == (500, 500)
    assert all(a + b <= 20 and a >= 1 for a, b in guess_grid(20))


@pytest.mark.parametrize("m", [500, 1000])
def test_all_correct_bound_is_the_closed_form(m):
    """Perfect separation with m/2 in: every canary guessed right by the two-sided r = m set, so at delta = 0 the
    bound is logit((alpha / |grid|)^(1/m)) (p-value q^r; Bonferroni over the 12 guess sets)."""
    scores_in, scores_out = np.linspace(5, 6, m // 2), np.linspace(-1, 0, m // 2)
    bound = one_run_lower_bound(scores_in, scores_out, 0.0, 0.95)
    assert (bound.guesses, bound.correct, bound.hypotheses, bound.m) == (m, m, 12, m)
    assert bound.epsilon == pytest.approx(float(logit((0.05 / 12) ** (1 / m))), abs=1e-7)
    assert bound.method == "Steinke et al. 2023 one-run" and bound.confidence == 0.95


def test_bound_at_its_guess_count_matches_jax_privacy(jp):
    for seed, (mu, delta) in enumerate([(1.0, 1e-5), (2.0, 1e-5), (3.0, 1e-4)]):
        scores_in, scores_out = gaussian_scores(seed, 1000, mu)
        bound = one_run_lower_bound(scores_in, scores_out, delta, 0.95)
        expected = jp._epsilon_one_run(0, 1000, bound.guesses, bound.correct, 0.05 / bound.hypotheses, delta)
        assert bound.epsilon > 0.3 and bound.epsilon == pytest.approx(expected, abs=1e-5)


def test_bound_is_sound_for_the_gaussian_mechanism():
    """20 seeds, m = 500: the lower bound never exceeds the true epsilon of mu-GDP at delta."""
    for mu in (1.0, 2.0):
        truth = gdp_epsilon_brentq(mu, DELTA)
        bounds = [one_run_lower_bound(*gaussian_scores(seed, 500, mu), DELTA, 0.95).epsilon for seed in range(20)]
        assert max(bounds) <= truth, (mu, truth, max(bounds))


def test_bound_is_sound_for_randomized_response():
    """Randomized response is exactly 1-DP, and the auditor's correct count is Binomial(r, q): the test is tight, so
    at 95 % the bound may exceed 1 in at most ~5 % of runs (here <= 10 of 100; without the Bonferroni correction
    over the guess grid it is ~18 of 100)."""
    exceed = sum(one_run_lower_bound(*rr_scores(seed, 500, 1.0), 0.0, 0.95).epsilon > 1.0 for seed in range(100))
    assert exceed <= 10


def test_bound_is_sound_with_delta():
    """Randomized response that reveals each coin with probability 0.05 is (1, 0.05)-DP: Steinke et al.'s delta term
    keeps the bound at or below 1 (dropping it puts ~28 of 30 runs above 1)."""
    exceed = sum(one_run_lower_bound(*rr_scores(seed, 1000, 1.0, 0.05), 0.05, 0.95).epsilon > 1.0
                 for seed in range(30))
    assert exceed <= 3


def test_bound_has_power():
    """mu = 8 (true eps ~ 65 at 1e-5): near perfect separation; the bound is above 4.5 at m = 1000 (at most
    logit((0.05/12)^(1/1000)) = 5.20 at delta = 0) and above 3.8 at m = 500 (at most 4.51)."""
    for seed in range(3):
        assert one_run_lower_bound(*gaussian_scores(seed, 1000, 8.0), DELTA, 0.95).epsilon > 4.5
        assert one_run_lower_bound(*gaussian_scores(seed, 500, 8.0), DELTA, 0.95).epsilon > 3.8


def test_ties_never_leak_membership():
    """Equal scores carry no information: ties are broken against the auditor, so all-equal scores give 0 whatever
    order the in and out sets arrive in (breaking ties by position would guess every canary right)."""
    bound = one_run_lower_bound(np.zeros(250), np.zeros(250), DELTA, 0.95)
    assert bound.epsilon == 0.0
    half = one_run_lower_bound(np.r_[np.zeros(200), np.ones(50)], np.zeros(250), 0.0, 0.95)
    assert half.epsilon < one_run_lower_bound(np.r_[np.full(200, 0.5), np.ones(50)], np.zeros(250), 0.0, 0.95).epsilon


def test_one_run_bad_input():
    with pytest.raises(ValueError, match="scores_in: 1 scores are not finite"):
        one_run_lower_bound([0.1, np.nan], [0.0], DELTA, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        one_run_lower_bound([0.1], [0.0], DELTA, 1.0)
    with pytest.raises(ValueError, match="delta"):
        one_run_lower_bound([0.1], [0.0], 1.0, 0.95)


# ------------------------------------------------------------------------------------------------ Andrew et al.
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_equal_variance_pair_is_gdp(delta):
    """N(0, 1) vs N(mu, 1): dp_accounting's Gaussian calibration (sigma for (eps, delta), mu = 1/sigma) round-trips,
    and Dong-Roth-Su's closed form gives back delta at the returned eps."""
    for eps in (0.5, 1.0, 2.0, 4.0, 8.0):
        mu = 1.0 / dp_accounting.get_sigma_gaussian(eps, delta)
        got = gaussian_pair_epsilon(0.0, 1.0, mu, 1.0, delta)
        assert got == pytest.approx(eps, abs=1e-6)
        assert norm.cdf(-got / mu + mu / 2) - math.exp(got) * norm.cdf(-got / mu - mu / 2) == pytest.approx(delta)
        assert gaussian_pair_epsilon(3.0, 2.0, 3.0 + 2.0 * mu, 2.0, delta) == pytest.approx(eps, abs=1e-6)


@pytest.mark.parametrize("mu0,sd0,mu1,sd1", [(0.0, 1.0, 2.0, 1.5), (0.0, 1.0, 1.0, 0.7), (0.0, 1.0, 0.0, 1.3)])
def test_unequal_variance_pair_by_quadrature(mu0, sd0, mu1, sd1):
    """At the returned eps the larger hockey-stick divergence (numerical integral of (p - e^eps q)_+) equals delta."""
    delta = 1e-3
    eps = gaussian_pair_epsilon(mu0, sd0, mu1, sd1, delta)

    def hockey(mp, sp, mq, sq):
        def f(x):
            return max(norm.pdf(x, mp, sp) - math.exp(eps) * norm.pdf(x, mq, sq), 0.0)
        return quad(f, -40, 40, points=[mp, mq], limit=400, epsabs=1e-12)[0]

    worst = max(hockey(mu1, sd1, mu0, sd0), hockey(mu0, sd0, mu1, sd1))
    assert eps > 0 and worst == pytest.approx(delta, rel=1e-4)


def test_gaussian_estimate_tracks_the_true_epsilon():
    """m = 2000, mu = 2 (true eps 10.0 at 1e-5), 20 seeds: the estimate is within 10 % at the median and 40 % at
    worst, and the 95 % bootstrap interval covers the truth in at least 13 of 20 runs (measured 15-16: fitting two
    free variances biases the estimate upward at small delta; the misses are all intervals above the truth)."""
    truth = gdp_epsilon_brentq(2.0, DELTA)
    rel, covered, below = [], 0, 0
    for seed in range(20):
        est = gaussian_estimate(*gaussian_scores(seed, 2000, 2.0), DELTA, 0.95, bootstrap=100, seed=seed)
        rel.append(abs(est.epsilon / truth - 1))
        covered += est.ci_low <= truth <= est.ci_high
        below += est.ci_high < truth
        assert est.mu == pytest.approx(2.0, abs=0.2)
    assert np.median(rel) <= 0.10 and max(rel) <= 0.40
    assert covered >= 13 and below == 0


def test_gaussian_estimate_is_seeded_and_honest_about_degenerate_input():
    scores_in, scores_out = gaussian_scores(0, 300, 1.0)
    a = gaussian_estimate(scores_in, scores_out, DELTA, 0.95, bootstrap=100, seed=3)
    b = gaussian_estimate(scores_in, scores_out, DELTA, 0.95, bootstrap=100, seed=3)
    assert a == b and a.ci_low <= a.ci_high and a.method == GAUSSIAN_METHOD
    split = gaussian_estimate(np.ones(5), np.zeros(5), DELTA, 0.95, bootstrap=10)  # zero sd: inf, resamples too
    assert split.epsilon == split.ci_low == split.ci_high == math.inf
    assert gaussian_estimate(np.zeros(5), np.zeros(5), DELTA, 0.95, bootstrap=10).ci_high == 0.0  # one point mass
    assert gaussian_pair_epsilon(0.0, 0.0, 1.0, 1.0, DELTA) == math.inf
    for args, name in [(([], [0.0, 1.0]), "scores_in"), (([0.0, 1.0], [1.0]), "scores_out"),
                       (([0.0, np.inf], [0.0, 1.0]), "scores_in")]:
        with pytest.raises(ValueError, match=name):
            gaussian_estimate(*args, DELTA, 0.95)
    with pytest.raises(ValueError, match="delta"):
        gaussian_estimate(scores_in, scores_out, 0.0, 0.95)


# ------------------------------------------------------------------------------------------------ pooled (mu-GDP)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_gdp_epsilon_is_the_gaussian_mechanisms_epsilon(delta):
    """mu = 1 / sigma of dp_accounting's Gaussian calibration for (eps, delta) gives back eps, and the closed form
    solved by brentq here agrees; mu 0 -> 0, inf -> inf, the sign of mu does not matter."""
    for eps in (0.3, 1.0, 2.0, 4.0, 8.0, 20.0):
        mu = 1.0 / dp_accounting.get_sigma_gaussian(eps, delta)
        assert gdp_epsilon(mu, delta) == pytest.approx(eps, abs=1e-6)
        assert gdp_epsilon(-mu, delta) == pytest.approx(gdp_epsilon_brentq(mu, delta), abs=1e-8)
    assert gdp_epsilon(0.0, delta) == 0.0 and gdp_epsilon(math.inf, delta) == math.inf
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, 0.0)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_pooled_estimate_tracks_the_true_epsilon(mu):
    """Simulated mu-GDP canaries (N(mu, 1) in, N(0, 1) out), m = 500, 20 seeds, true eps 2.0 / 4.4 / 10.0 at 1e-5:
    the pooled estimate's median relative error is <= 5 % (measured, 40 seeds: -0.4 % / +0.4 % / +0.7 %), its worst
    <= 40 % (measured 36 % / 21 % / 14 %), its 95 % interval covers the truth in >= 17 of 20 runs and its lower end
    is never above the truth. The two-variance fit on the same scores is biased upward (measured median +31 % /
    +18 % / +11 %): it fails the 5 % median check here, which is why it is not the headline."""
    truth = gdp_epsilon_brentq(mu, DELTA)
    rel, rel_two, covered = [], [], 0
    for seed in range(20):
        scores = gaussian_scores(seed, 500, mu)
        est = pooled_gaussian_estimate(*scores, DELTA, 0.95, bootstrap=200, seed=seed)
        assert est.method == POOLED_METHOD and est.ci_low <= truth, (seed, est)
        rel.append(est.epsilon / truth - 1)
        rel_two.append(gaussian_estimate(*scores, DELTA, 0.95, bootstrap=0).epsilon / truth - 1)
        covered += est.ci_low <= truth <= est.ci_high
    assert abs(np.median(rel)) <= 0.05 and max(map(abs, rel)) <= 0.40, rel
    assert covered >= 17
    assert np.median(rel_two) > 0.05  # the two-variance fit's upward bias, stated in its docstring


def test_pooled_estimate_is_seeded_and_honest_about_degenerate_input():
    scores_in, scores_out = gaussian_scores(0, 300, 1.0)
    a = pooled_gaussian_estimate(scores_in, scores_out, DELTA, 0.95, bootstrap=100, seed=3)
    assert a == pooled_gaussian_estimate(scores_in, scores_out, DELTA, 0.95, bootstrap=100, seed=3)
    pooled = math.sqrt(((scores_in.size - 1) * scores_in.var(ddof=1) + (scores_out.size - 1) * scores_out.var(ddof=1))
                       / (scores_in.size + scores_out.size - 2))
    assert a.mu == pytest.approx((scores_in.mean() - scores_out.mean()) / pooled)
    assert a.epsilon == pytest.approx(gdp_epsilon_brentq(abs(a.mu), DELTA), abs=1e-6)
    assert a.ci_low <= a.epsilon <= a.ci_high
    split = pooled_gaussian_estimate(np.ones(5), np.zeros(5), DELTA, 0.95, bootstrap=10)
    assert split.epsilon == split.ci_low == split.ci_high == math.inf
    assert pooled_gaussian_estimate(np.zeros(5), np.zeros(5), DELTA, 0.95, bootstrap=10).ci_high == 0.0
    for args, name in [(([], [0.0, 1.0]), "scores_in"), (([0.0, 1.0], [np.nan, 1.0]), "scores_out")]:
        with pytest.raises(ValueError, match=name):
            pooled_gaussian_estimate(*args, DELTA, 0.95)
