"""Gaussian-fit epsilon ESTIMATES from canary scores (not bounds): the pooled (equal-variance, mu-GDP) fit that
the audit reports as its headline estimate, and Andrew et al.'s two-variance fit beside it.

Inputs: ``scores_in`` (k,) and ``scores_out`` (m - k,), one float per canary (the cosines of
:meth:`fedsim.audit.canaries.CanarySet.scores`); ``delta`` the DP delta; ``confidence`` in (0, 1).

* :func:`pooled_gaussian_estimate` (the headline estimate): fit ONE Gaussian variance to both groups (pooled), so
  mu = (mean_in - mean_out) / pooled sd is the mu of mu-GDP, and convert with Dong, Roth, Su's closed form
  (:func:`gdp_epsilon`, "Gaussian differential privacy", Cor. 2.13), as Nasr et al. 2023 ("Tight auditing of
  differentially private machine learning") and jax_privacy's ``epsilon_from_gdp`` do; seeded percentile-bootstrap
  interval. Andrew et al.'s Gaussian-mechanism analysis has both cosine distributions with variance ~1/d, so one
  variance is the model the canaries follow; its only free parameter is mu, whose sampling error moves epsilon
  smoothly (simulated mu-GDP canaries, m = 500, 40 seeds: median error under 1 % for mu 0.5 / 1 / 2, worst
  36 % / 21 % / 14 %; tests/test_audit_estimators.py).
* :func:`gaussian_estimate` (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot empirical privacy
  estimation for federated learning", arXiv 2302.03098, ICLR 2024, Sec. 3): fit one Gaussian to the included and
  one to the left-out canaries' scores and report the epsilon at which the two fitted Gaussians are
  (eps, delta)-indistinguishable (:func:`gaussian_pair_epsilon`), with a seeded percentile-bootstrap interval.
  BIASED UPWARD at small delta: any sampling difference of the two sds makes the likelihood ratio unbounded in a
  tail, and at delta = 1e-5 that tail decides epsilon (simulated mu-GDP canaries, m = 500: median +31 % / +18 % /
  +11 % for mu 0.5 / 1 / 2; an honest central-DP run: 4.2 vs the accountant's 1.9 from a sd ratio of 0.86).
  Reported beside the pooled fit, not as the headline.

Both are ESTIMATES under a Gaussian model of the scores, NOT bounds: either can lie above the true epsilon by
chance, which proves nothing; only :func:`one_run_lower_bound` above the accountant's epsilon does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from fedsim.audit.estimators import as_scores, check_levels

GAUSSIAN_METHOD = "Andrew et al. 2024 Gaussian fit, two variances (biased upward at small delta)"
POOLED_METHOD = "equal-variance Gaussian fit, mu-GDP (Dong, Roth, Su Cor. 2.13; as Nasr et al. 2023)"


@dataclass(frozen=True)
class GaussianEstimate:
    """A Gaussian-fit estimate ``epsilon`` (nats; an estimate, not a bound) with its percentile-bootstrap
    interval [``ci_low``, ``ci_high``] at ``confidence``; ``mu`` = (mean_in - mean_out) / pooled sd (the
    (n - 1)-weighted variance of both groups), the mu of mu-GDP; ``mean_*`` / ``sd_*`` the groups' means and sample
    sds; ``method`` names the fit (:data:`POOLED_METHOD` or :data:`GAUSSIAN_METHOD`)."""

    epsilon: float
    ci_low: float
    ci_high: float
    mu: float
    confidence: float
    delta: float
    method: str
    mean_in: float
    sd_in: float
    mean_out: float
    sd_out: float


# ------------------------------------------------------------------------------------------------ Andrew et al.
def _log_outside(x1: np.ndarray, x2: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """log P[X < x1 or X > x2] for X ~ N(mean, sd^2), x1 <= x2 (either may be +-inf)."""
    with np.errstate(over="ignore"):
        return np.logaddexp(log_ndtr((x1 - mean) / sd), log_ndtr((mean - x2) / sd))


def _log_inside(x1: np.ndarray, x2: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """log P[x1 < X < x2] for X ~ N(mean, sd^2), without cancellation when both ends lie in one tail."""
    with np.errstate(over="ignore"):
        za, zb = (x1 - mean) / sd, (x2 - mean) / sd
    upper = za > 0  # both ends above the mean: P = S(za) - S(zb), else Phi(zb) - Phi(za)
    big = np.where(upper, log_ndtr(-za), log_ndtr(zb))
    small = np.where(upper, log_ndtr(-zb), log_ndtr(za))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = big + np.log1p(-np.exp(np.minimum(small - big, 0.0)))
    return np.where(za < zb, out, -np.inf)


def _hockey_stick(eps: np.ndarray, mu_p: np.ndarray, sd_p: np.ndarray, mu_q: np.ndarray,
                  sd_q: np.ndarray) -> np.ndarray:
    """H_{e^eps}(P || Q) = sup_S P[S] - e^eps Q[S] for P = N(mu_p, sd_p^2), Q = N(mu_q, sd_q^2), elementwise.

    The optimal S is where log p/q > eps: A x^2 + B x + C > 0, a half line (A = 0), the outside of the two roots
    (A > 0; everything when there is no root) or the inside (A < 0; nothing when there is no root). Masses are
    exact normal CDFs in log space, roots by the cancellation-free quadratic formula."""
    a = 0.5 / sd_q**2 - 0.5 / sd_p**2
    b = mu_p / sd_p**2 - mu_q / sd_q**2
    c = 0.5 * mu_q**2 / sd_q**2 - 0.5 * mu_p**2 / sd_p**2 + np.log(sd_q / sd_p) - eps
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        qq = -0.5 * (b + np.copysign(np.sqrt(np.maximum(disc, 0.0)), b))
        r1, r2 = qq / a, c / qq
        t = -c / b
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    linear, roots = a == 0, disc > 0
    # outside-type regions: (-inf, x1) U (x2, inf); inside-type: (x1, x2)
    x1 = np.where(linear, np.where(b > 0, -np.inf, t), np.where(roots, lo, np.inf))
    x2 = np.where(linear, np.where(b > 0, t, np.inf), np.where(roots, hi, np.inf))
    outside = (linear & (b != 0)) | (a > 0)
    x1, x2 = np.nan_to_num(x1, nan=0.0), np.nan_to_num(x2, nan=0.0)
    log_p = np.where(outside, _log_outside(x1, x2, mu_p, sd_p), _log_inside(x1, x2, mu_p, sd_p))
    log_q = np.where(outside, _log_outside(x1, x2, mu_q, sd_q), _log_inside(x1, x2, mu_q, sd_q))
    with np.errstate(invalid="ignore"):
        h = -np.exp(log_p) * np.expm1(np.minimum(eps + log_q - log_p, 0.0))
    return np.where(log_p > -np.inf, np.maximum(h, 0.0), 0.0)


def _pair_epsilons(delta: float, mu0: np.ndarray, sd0: np.ndarray, mu1: np.ndarray, sd1: np.ndarray) -> np.ndarray:
    """Vectorized :func:`gaussian_pair_epsilon` for positive sds: bracket by doubling, then 48 bisection steps
    (relative error < 1e-14) on the decreasing H_{e^eps} - delta, in both directions."""
    out = np.zeros(np.broadcast(mu0, sd0, mu1, sd1).shape)
    for args in ((mu1, sd1, mu0, sd0), (mu0, sd0, mu1, sd1)):
        args = tuple(np.broadcast_to(np.asarray(x, dtype=np.float64), out.shape) for x in args)
        positive = _hockey_stick(np.zeros(out.shape), *args) > delta
        hi = np.ones(out.shape)
        for _ in range(40):
            grow = positive & (_hockey_stick(hi, *args) > delta)
            if not grow.any():
                break
            hi = np.where(grow, 2 * hi, hi)
        unbounded = positive & (_hockey_stick(hi, *args) > delta)  # eps beyond 2^40: inf
        lo = np.where(hi > 1, hi / 2, 0.0)
        for _ in range(48):
            mid = 0.5 * (lo + hi)
            above = _hockey_stick(mid, *args) > delta
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        out = np.maximum(out, np.where(unbounded, np.inf, np.where(positive, hi, 0.0)))
    return out


def _degenerate_rule(mu0: np.ndarray, sd0: np.ndarray, mu1: np.ndarray, sd1: np.ndarray,
                     eps: np.ndarray) -> np.ndarray:
    """A zero sd on either side: inf, except two point masses at the same value: 0."""
    zero = (sd0 == 0) | (sd1 == 0)
    same = (sd0 == 0) & (sd1 == 0) & (mu0 == mu1)
    return np.where(zero, np.where(same, 0.0, np.inf), eps)
def gaussian_pair_epsilon(mu0: float, sd0: float, mu1: float, sd1: float, delta: float) -> float:
    """The smallest eps >= 0 with N(mu0, sd0^2) and N(mu1, sd1^2) (eps, delta)-indistinguishable.

    The hockey-stick divergence H_{e^eps} is computed exactly (normal CDFs over the region where the likelihood
    ratio exceeds e^eps) in both directions and the larger eps is returned (bisection to relative 1e-14). Equal
    variances reduce to mu-GDP with mu = |mu1 - mu0| / sd (Dong, Roth, Su, "Gaussian differential privacy",
    Cor. 2.13: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)). Degenerate rule: a zero sd on
    either side gives inf (a point mass is distinguishable from any other distribution at every delta < 1),
    except two point masses at the same value (0). Raises ValueError for negative sds or delta outside (0, 1).
    """
    if sd0 < 0 or sd1 < 0 or not all(map(math.isfinite, (mu0, sd0, mu1, sd1))):
        raise ValueError(f"gaussian_pair_epsilon: need finite means and sds >= 0; got {mu0}, {sd0}, {mu1}, {sd1}")
    check_levels(delta, 0.5, delta_positive=True)
    if sd0 == 0 or sd1 == 0:
        return 0.0 if (sd0 == sd1 and mu0 == mu1) else math.inf
    return float(_pair_epsilons(delta, np.array(mu0), np.array(sd0), np.array(mu1), np.array(sd1)))


def _resample(s_in: np.ndarray, s_out: np.ndarray, bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bootstrap, k) and (bootstrap, m - k) resamples with replacement within each set (seeded numpy generator)."""
    rng = np.random.default_rng(seed)
    return (s_in[rng.integers(0, s_in.size, (bootstrap, s_in.size))],
            s_out[rng.integers(0, s_out.size, (bootstrap, s_out.size))])


def _interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    return float(np.quantile(draws, tail, method="lower")), float(np.quantile(draws, 1.0 - tail, method="higher"))


def _pooled_mu(b_in: np.ndarray, b_out: np.ndarray) -> np.ndarray:
    """Signed mu = (mean_in - mean_out) / pooled sd along the last axis; +-inf (0 for equal means) at zero sd."""
    n_in, n_out = b_in.shape[-1], b_out.shape[-1]
    var = ((n_in - 1) * b_in.var(-1, ddof=1) + (n_out - 1) * b_out.var(-1, ddof=1)) / (n_in + n_out - 2)
    diff = b_in.mean(-1) - b_out.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, diff / np.sqrt(np.where(var > 0, var, 1.0)), np.where(diff == 0, 0.0, diff * np.inf))


def _gdp_epsilons(mu: np.ndarray, delta: float) -> np.ndarray:
    """Vectorized :func:`gdp_epsilon` for |mu| (bracket by doubling, 64 bisection steps in the log domain)."""
    mu = np.abs(np.asarray(mu, dtype=np.float64))
    finite = np.isfinite(mu) & (mu > 0)
    m = np.where(finite, mu, 1.0)

    def above(eps: np.ndarray) -> np.ndarray:  # delta(eps) > delta, with delta(eps) the Cor. 2.13 curve
        x, y = log_ndtr(-eps / m + m / 2), eps + log_ndtr(-eps / m - m / 2)
        with np.errstate(divide="ignore"):
            return x + np.log1p(-np.exp(np.minimum(y - x, 0.0))) > math.log(delta)

    positive = finite & above(np.zeros(m.shape))
    hi = np.ones(m.shape)
    for _ in range(60):
        grow = positive & above(hi)
        if not grow.any():
            break
        hi = np.where(grow, 2 * hi, hi)
    lo = np.where(hi > 1, hi / 2, 0.0)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        up = above(mid)
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return np.where(np.isinf(mu), np.inf, np.where(positive, hi, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at ``delta``: the smallest eps >= 0 with Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu -
    mu/2) <= delta (Dong, Roth, Su, "Gaussian differential privacy", JRSS-B 2022, Cor. 2.13), i.e. the epsilon of
    N(0, 1) vs N(mu, 1). Uses |mu|; 0 for mu = 0, inf for infinite mu. Bisection to relative ~1e-16.
    Raises ValueError for a NaN mu or delta outside (0, 1)."""
    if math.isnan(mu):
        raise ValueError("gdp_epsilon: mu is NaN")
    check_levels(delta, 0.5, delta_positive=True)
    return float(_gdp_epsilons(np.array(mu), delta))


def _checked(scores_in: object, scores_out: object, delta: float, confidence: float,
             bootstrap: int) -> tuple[np.ndarray, np.ndarray]:
    """Both fits' inputs as (k,) and (m - k,) arrays, or ValueError naming what is wrong."""
    s_in, s_out = as_scores(scores_in, "scores_in", 2), as_scores(scores_out, "scores_out", 2)
    check_levels(delta, confidence, delta_positive=True)
    if bootstrap < 0:
        raise ValueError(f"bootstrap: {bootstrap} must be >= 0")
    return s_in, s_out


def pooled_gaussian_estimate(scores_in: object, scores_out: object, delta: float, confidence: float,
                             bootstrap: int = 1000, seed: int = 0) -> GaussianEstimate:
    """The equal-variance (pooled) Gaussian-fit epsilon ESTIMATE (not a bound) from the canaries' scores.

    ``scores_in`` (k,) and ``scores_out`` (m - k,): mu = (mean_in - mean_out) / pooled sd, ``epsilon`` =
    :func:`gdp_epsilon` (|mu|, ``delta``) (Dong, Roth, Su Cor. 2.13; the conversion of Nasr et al. 2023 and
    jax_privacy's ``epsilon_from_gdp``). [``ci_low``, ``ci_high``]: the (1 -/+ confidence)/2 percentiles of
    ``bootstrap`` re-estimates on canaries resampled with replacement within each set (seeded by ``seed``);
    ``bootstrap=0`` gives the point estimate as both ends. Zero pooled variance: inf (0 if the means are equal).
    Raises ValueError naming ``scores_in`` / ``scores_out`` when one has fewer than 2 scores or a non-finite one,
    and for delta outside (0, 1), confidence outside (0, 1) or bootstrap < 0.
    """
    s_in, s_out = _checked(scores_in, scores_out, delta, confidence, bootstrap)
    mu = float(_pooled_mu(s_in, s_out))
    eps = float(_gdp_epsilons(np.array(mu), delta))
    lo, hi = (_interval(_gdp_epsilons(_pooled_mu(*_resample(s_in, s_out, bootstrap, seed)), delta), confidence)
              if bootstrap else (eps, eps))
    return GaussianEstimate(epsilon=eps, ci_low=lo, ci_high=hi, mu=mu, confidence=confidence, delta=delta,
                            method=POOLED_METHOD, mean_in=float(s_in.mean()), sd_in=float(s_in.std(ddof=1)),
                            mean_out=float(s_out.mean()), sd_out=float(s_out.std(ddof=1)))


def gaussian_estimate(scores_in: object, scores_out: object, delta: float, confidence: float,
                      bootstrap: int = 1000, seed: int = 0) -> GaussianEstimate:
    """Andrew et al.'s two-variance epsilon ESTIMATE (not a bound; biased upward at small delta) from the scores.

    ``scores_in`` (k,) and ``scores_out`` (m - k,) are each fitted by a Gaussian (mean, sample sd with ddof=1);
    ``epsilon`` = :func:`gaussian_pair_epsilon` of the two fits at ``delta``. [``ci_low``, ``ci_high``]: the
    (1 -/+ confidence)/2 percentiles of ``bootstrap`` re-estimates on canaries resampled with replacement within
    each set (numpy generator seeded by ``seed``; the same inputs give the same interval); ``bootstrap=0`` gives
    the point estimate as both ends. Zero-variance sets follow :func:`gaussian_pair_epsilon` (inf). Unequal fitted
    sds make the likelihood ratio unbounded in one tail, which decides epsilon at small delta: sampling noise in
    the sd ratio alone inflates it (see the module docstring; :func:`pooled_gaussian_estimate` is the headline).
    Raises ValueError naming ``scores_in`` / ``scores_out`` when one has fewer than 2 scores or a non-finite one,
    and for delta outside (0, 1), confidence outside (0, 1) or bootstrap < 0.
    """
    s_in, s_out = _checked(scores_in, scores_out, delta, confidence, bootstrap)
    sd_in, sd_out = float(s_in.std(ddof=1)), float(s_out.std(ddof=1))
    eps = gaussian_pair_epsilon(float(s_out.mean()), sd_out, float(s_in.mean()), sd_in, delta)
    lo = hi = eps
    if bootstrap:
        b_in, b_out = _resample(s_in, s_out, bootstrap, seed)
        fits = (b_out.mean(1), b_out.std(1, ddof=1), b_in.mean(1), b_in.std(1, ddof=1))
        safe = [np.where(x > 0, x, 1.0) if k % 2 else x for k, x in enumerate(fits)]
        lo, hi = _interval(_degenerate_rule(*fits, _pair_epsilons(delta, *safe)), confidence)
    return GaussianEstimate(epsilon=eps, ci_low=lo, ci_high=hi, mu=float(_pooled_mu(s_in, s_out)),
                            confidence=confidence, delta=delta, method=GAUSSIAN_METHOD, mean_in=float(s_in.mean()),
                            sd_in=sd_in, mean_out=float(s_out.mean()), sd_out=sd_out)
