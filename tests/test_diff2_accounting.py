"""DIFF2's noise calibration and privacy accounting (fedsim.privacy.diff2; spec algorithms-more.md §9.3).

Kinds guarded: a sigma, alpha or bound that drifts from the authors' formulas (the spec's table, every digit);
an epsilon that disagrees between accountants (each compared with an independent computation: PLD with the
exact Gaussian curve evaluated here with scipy, both RDP implementations with the closed-form Gaussian RDP
``alpha mu^2 / 2`` converted by hand); restarts counted as R/T when T does not divide R.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy.stats import norm

from fedsim.privacy import diff2 as acct
from fedsim.privacy.accounting import dp_accounting_epsilon, opacus_epsilon

# Spec §9.3's table: California Housing, n_min = 1651, P = 10, R = 2000, delta = 1e-5.
N_MIN, P, R, DELTA = 1651, 10, 2000, 1e-5
TABLE = {  # epsilon: (alpha, sigma1 at T = 1/6/20/60/200, sigma2, resulting epsilon bound)
    3: (9, (0.00938, 0.00428, 0.00235, 0.00135, 0.00074), 0.02098, 2.939),
    5: (6, (0.00593, 0.00271, 0.00148, 0.00086, 0.00047), 0.01327, 4.803),
}
PERIODS = (1, 6, 20, 60, 200)


@pytest.mark.parametrize("eps", sorted(TABLE))
def test_the_spec_sigma_table_is_reproduced_digit_for_digit(eps) -> None:
    alpha, sigma1s, sigma2, bound = TABLE[eps]
    for period, expected in zip(PERIODS, sigma1s, strict=True):
        cal = acct.closed_form_sigmas(eps, DELTA, R, period, N_MIN, P, authors_count=True)
        assert cal.alpha == alpha
        assert round(cal.sigma1, 5) == expected, period
        assert round(cal.sigma2, 5) == sigma2
        # the 'Resulting epsilon bound' column: the authors' counts (R/T restarts, all R rounds as differences)
        z1, z2 = (acct.noise_multiplier(s, N_MIN, P) for s in (cal.sigma1, cal.sigma2))
        restarts, differences = R / period, (R if period > 1 else 0)
        assert round(acct.closed_form_epsilon(z1, z2, restarts, differences, DELTA, alpha), 3) == bound
    # hand check of one entry from the formula itself: sigma1 = sqrt(4u alpha R / (T n^2 P^2 eps)), u = 1.25
    assert math.isclose(acct.closed_form_sigmas(eps, DELTA, R, 20, N_MIN, P).sigma1,
                        math.sqrt(5 * alpha * R / (20 * N_MIN**2 * P**2 * eps)))


def test_restarts_are_counted_as_ceil_r_over_t() -> None:
    """T = 6 does not divide R = 2000: 334 restarts happen, not 333.3; fedsim calibrates (and accounts) 334,
    which asks for slightly more noise than the authors' table, never less."""
    assert acct.restarts(2000, 6) == 334 and acct.restarts(2000, 20) == 100 and acct.restarts(5, 5) == 1
    ours = acct.closed_form_sigmas(3, DELTA, R, 6, N_MIN, P).sigma1
    theirs = acct.closed_form_sigmas(3, DELTA, R, 6, N_MIN, P, authors_count=True).sigma1
    assert math.isclose(ours / theirs, math.sqrt(334 / (2000 / 6)))


def gaussian_curve_epsilon(mu: float, delta: float) -> float:
    """Independent of fedsim: bisection on Balle & Wang's delta(eps) with scipy.stats.norm (no log space)."""
    def d(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2)

    lo, hi = 0.0, 64.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def rdp_by_hand(mu: float, delta: float) -> float:
    """Gaussian RDP alpha mu^2 / 2 (Mironov 2017), converted with Canonne et al.'s bound over a fine order grid."""
    alphas = np.concatenate([np.linspace(1.01, 10, 9000), np.linspace(10, 1024, 20000)])
    eps = alphas * mu**2 / 2 + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


@pytest.mark.parametrize(("eps", "period"), [(3, 1), (3, 20), (5, 200), (5, 6)])
def test_every_epsilon_agrees_with_an_independent_computation_within_one_percent(eps, period) -> None:
    cal = acct.closed_form_sigmas(eps, DELTA, R, period, N_MIN, P)
    z1, z2 = (acct.noise_multiplier(s, N_MIN, P) for s in (cal.sigma1, cal.sigma2))
    restarts = acct.restarts(R, period)
    differences = R - restarts
    got = acct.accounted(z1, z2, restarts, differences, DELTA)
    mu = math.sqrt(restarts / z1**2 + differences / z2**2)  # the composition is one Gaussian mechanism
    exact = gaussian_curve_epsilon(mu, DELTA)
    assert got["epsilon_dp_accounting_pld"] == pytest.approx(exact, rel=0.01)  # PLD is tight
    assert got["epsilon_exact"] == pytest.approx(exact, rel=1e-6)
    hand = rdp_by_hand(mu, DELTA)
    assert got["epsilon"] == pytest.approx(hand, rel=0.01)  # Opacus RDP
    assert got["epsilon_dp_accounting_rdp"] == pytest.approx(hand, rel=0.01)  # Google's RDP
    # the tight figure is below the RDP one, which is below the authors' bound, which is below the target
    closed = acct.closed_form_epsilon(z1, z2, restarts, differences, DELTA, cal.alpha)
    assert exact < got["epsilon"] < closed <= eps


def test_the_dp_accounting_events_are_the_gaussian_sequence() -> None:
    """The accountants see ceil(R/T) Gaussians of multiplier z1 and R - ceil(R/T) of z2, nothing else:
    compared with dp_accounting composing the two self-composed events built here."""
    cal = acct.closed_form_sigmas(3, DELTA, 50, 7, 40, 4)
    z1, z2 = (acct.noise_multiplier(s, 40, 4) for s in (cal.sigma1, cal.sigma2))
    event = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z1), 8),
                                           dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z2), 42)])
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event)
    assert acct.accounted(z1, z2, 8, 42, DELTA)["epsilon_dp_accounting_rdp"] == pytest.approx(acc.get_epsilon(DELTA))


def test_rdp_calibration_meets_the_target_with_the_rdp_accountant() -> None:
    cal = acct.closed_form_sigmas(3, DELTA, R, 20, N_MIN, P)
    tuned = acct.rdp_calibrated(cal, 3, DELTA, R, 20, N_MIN, P)
    z1, z2 = (acct.noise_multiplier(s, N_MIN, P) for s in (tuned.sigma1, tuned.sigma2))
    history = [(z1, 1.0, 100), (z2, 1.0, 1900)]
    assert opacus_epsilon(history, DELTA) == pytest.approx(3, rel=1e-4)
    assert dp_accounting_epsilon(history, DELTA, "rdp") == pytest.approx(3, rel=0.01)
    assert tuned.sigma1 / cal.sigma1 == pytest.approx(tuned.sigma2 / cal.sigma2) and tuned.sigma1 < cal.sigma1


def test_local_noise_is_weaker_against_the_server_by_sqrt_p_over_the_n_min_p_gap() -> None:
    """A client's own message: noise std sqrt(P) C sigma over sensitivity 2C/n_p (by hand: z = sqrt(P) sigma n_p/2)."""
    assert acct.local_noise_multiplier(0.01, 100, 9) == pytest.approx(3 * 0.01 * 100 / 2)
    released = acct.noise_multiplier(0.01, 100, 9)  # sigma n_min P / 2
    assert released / acct.local_noise_multiplier(0.01, 100, 9) == pytest.approx(3.0)  # sqrt(P)
