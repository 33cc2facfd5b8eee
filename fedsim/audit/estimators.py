"""Empirical epsilon from canary scores: a one-run lower bound and a Gaussian-fit estimate.

Inputs everywhere: ``scores_in`` (k,) and ``scores_out`` (m - k,), one float per canary, higher = more likely
included (the cosines of :meth:`fedsim.audit.canaries.CanarySet.scores`); ``delta`` the DP delta the epsilon is
stated at; ``confidence`` in (0, 1).

* :func:`one_run_lower_bound` (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS
  2023, arXiv 2305.08846): a guessing game over the canaries' in/out coins. Under (eps, delta)-DP the number of
  correct guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their
  Theorem 5.2, Algorithm 2: :func:`one_run_p_value`). The result is a LOWER BOUND that holds with probability
  >= ``confidence`` for any score, whatever the mechanism: a bound above the accountant's epsilon is proof of a bug.
  The guess counts are fixed in advance (:func:`guess_grid`, a function of m only) and the significance is split
  over them (Bonferroni), so picking the best of them does not void the confidence.
* :func:`gaussian_estimate` (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot empirical privacy
  estimation for federated learning", arXiv 2302.03098, ICLR 2024, Sec. 3): fit one Gaussian to the included and
  one to the left-out canaries' scores and report the epsilon at which the two fitted Gaussians are
  (eps, delta)-indistinguishable (:func:`gaussian_pair_epsilon`), with a seeded percentile-bootstrap interval.
  An ESTIMATE under a Gaussian model of the scores, NOT a bound: it can lie above the true epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import bdtrc, expit, log_ndtr, logit

ONE_RUN_METHOD = "Steinke et al. 2023 one-run"
GAUSSIAN_METHOD = "Andrew et al. 2024 Gaussian fit"
#: one-sided guesses: the top ceil(f m) scores guessed "in"
ONE_SIDED_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: two-sided guesses: r = round(f m) guesses, the top ceil(r/2) "in" and the bottom floor(r/2) "out"
TWO_SIDED_FRACTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
_SCAN = 64  # eps grid points searched for the first eps whose p-value exceeds the significance


@dataclass(frozen=True)
class OneRunBound:
    """Steinke et al.'s epsilon lower bound: ``epsilon`` (>= 0, nats) holds with probability ``confidence``.

    ``guesses`` r = ``guesses_in`` + ``guesses_out`` of the guess set that gave it (of ``hypotheses`` sets tried,
    Bonferroni-corrected), ``correct`` v of them right, ``m`` canaries in all, at DP ``delta``."""

    epsilon: float
    guesses: int
    correct: int
    m: int
    confidence: float
    method: str
    guesses_in: int
    guesses_out: int
    hypotheses: int
    delta: float


@dataclass(frozen=True)
class GaussianEstimate:
    """Andrew et al.'s estimate ``epsilon`` (nats; an estimate, not a bound) with its percentile-bootstrap
    interval [``ci_low``, ``ci_high``] at ``confidence``; ``mu`` = (mean_in - mean_out) / sqrt((sd_in^2 +
    sd_out^2) / 2), the mu of mu-GDP when both variances are equal; ``mean_*`` / ``sd_*`` the fitted Gaussians."""

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


# ------------------------------------------------------------------------------------------------ checks
def _scores(values: object, name: str, minimum: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size < minimum:
        raise ValueError(f"{name}: {arr.size} scores, need at least {minimum}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {int(np.sum(~np.isfinite(arr)))} scores are not finite")
    return arr


def _check(delta: float, confidence: float, delta_positive: bool) -> None:
    if not ((delta > 0 if delta_positive else delta >= 0) and delta < 1):
        raise ValueError(f"delta: {delta} must be in {'(0' if delta_positive else '[0'}, 1)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence} must be in (0, 1)")


# ------------------------------------------------------------------------------------------------ Steinke et al.
def _p_values(m: int, r: int, v: int, eps: np.ndarray, delta: float) -> np.ndarray:
    """Vectorized :func:`one_run_p_value` over an array of eps."""
    eps = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if v <= 0:
        return np.ones_like(eps)
    q = expit(eps)
    beta = bdtrc(v - 1, r, q)  # P[Binomial(r, q) >= v]
    if delta == 0:
        return np.minimum(beta, 1.0)
    i = np.arange(1, v + 1)[:, None]
    tail = bdtrc(v - i - 1, r, q[None, :]) - beta[None, :]  # P[v - i <= W < v]  (bdtrc(-1, .) = 1)
    alpha = np.max(tail / i, axis=0)
    return np.minimum(beta + alpha * delta * 2 * m, 1.0)


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v of r guesses correct] bound under (eps, delta)-DP, m canaries each included w.p. 1/2.

    Steinke et al. 2023, Theorem 5.2 / Algorithm 2: with q = e^eps / (1 + e^eps), W ~ Binomial(r, q),
    beta = P[W >= v] and alpha = max_{i = 1..v} P[v - i <= W < v] / i, the p-value is
    min(1, beta + 2 m delta alpha). At delta = 0 it is the binomial tail; v = r gives q^r.
    Raises ValueError unless 0 <= v <= r <= m, eps >= 0 and 0 <= delta <= 1.
    """
    if not (0 <= v <= r <= m) or eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"one_run_p_value: need 0 <= v <= r <= m, eps >= 0, delta in [0, 1]; got m={m}, r={r}, "
                         f"v={v}, eps={eps}, delta={delta}")
    return float(_p_values(m, r, v, np.array([eps]), delta)[0])


def _one_run_epsilon(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The first eps >= 0 whose p-value exceeds ``significance`` (0 when eps = 0 already does): every smaller eps
    is rejected, so the bound is sound even where the delta term makes the p-value non-monotone in eps."""
    if v <= 0 or _p_values(m, r, v, np.zeros(1), 0.0)[0] > significance:
        return 0.0
    if _p_values(m, r, v, np.zeros(1), delta)[0] > significance:
        return 0.0
    top = float(logit(significance ** (1.0 / r)))  # p >= q^r > significance beyond it
    grid = np.linspace(0.0, top, _SCAN)
    over = np.flatnonzero(_p_values(m, r, v, grid, delta) > significance)
    if over.size == 0:
        return top
    lo, hi = grid[over[0] - 1], grid[over[0]]
    return float(brentq(lambda e: significance - _p_values(m, r, v, np.array([e]), delta)[0], lo, hi, xtol=1e-9))


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The guess sets tried for m canaries, fixed before any score is seen: (guesses_in, guesses_out) pairs.

    One-sided: the top ceil(f m) scores guessed "in", f in :data:`ONE_SIDED_FRACTIONS`; two-sided: r = round(f m)
    guesses (f in :data:`TWO_SIDED_FRACTIONS`), the top ceil(r/2) "in" and the bottom floor(r/2) "out". Duplicates
    (small m) are dropped; the Bonferroni correction divides the significance by the length of this list.
    """
    pairs: list[tuple[int, int]] = []
    for f in ONE_SIDED_FRACTIONS:
        pairs.append((max(1, math.ceil(f * m)), 0))
    for f in TWO_SIDED_FRACTIONS:
        r = max(2, min(m, round(f * m)))
        pairs.append(((r + 1) // 2, r // 2))
    return list(dict.fromkeys(p for p in pairs if p[0] + p[1] <= m))


def _correct_counts(scores_in: np.ndarray, scores_out: np.ndarray, grid: list[tuple[int, int]]) -> list[int]:
    """Correct guesses of each grid entry, ties broken AGAINST the auditor (an "in" canary ranks below an "out"
    one of equal score): never more than a guesser that breaks ties at random would get, so the bound stays sound."""
    scores = np.concatenate([scores_in, scores_out])
    label = np.concatenate([np.ones(scores_in.size, int), np.zeros(scores_out.size, int)])
    order = np.lexsort((1 - label, scores))  # ascending score; among ties "in" first (lowest)
    ranked = label[order]
    in_from_top = np.concatenate([[0], np.cumsum(ranked[::-1])])
    out_from_bottom = np.concatenate([[0], np.cumsum(1 - ranked)])
    return [int(in_from_top[k_in] + out_from_bottom[k_out]) for k_in, k_out in grid]


def one_run_lower_bound(scores_in: object, scores_out: object, delta: float, confidence: float) -> OneRunBound:
    """Steinke et al.'s one-run epsilon lower bound at ``confidence`` from the canaries' scores.

    ``scores_in``: (k,) scores of the included canaries; ``scores_out``: (m - k,) of the left-out ones (either may
    be empty; m >= 1). For each guess set of :func:`guess_grid` (m) the auditor's correct count v of r guesses gives
    the largest eps below which every p-value (:func:`one_run_p_value`) is <= (1 - confidence) / |grid| (the first
    crossing, found on a 64-point scan then brentq; the p-value was increasing in eps in every case checked, where
    this is the largest eps with p-value <= the level); the bound is the largest of these (0 when none is
    rejected), reported with that set's r and v. The most it can reach is
    logit(((1 - confidence) / |grid|)^(1/m)) at delta = 0 (every canary guessed right). Holds for any mechanism that
    is (eps, delta)-DP in each canary's coin, with probability >= ``confidence`` over the coins and the run.
    Raises ValueError for non-finite scores, m = 0, delta outside [0, 1) or confidence outside (0, 1).
    """
    s_in, s_out = _scores(scores_in, "scores_in", 0), _scores(scores_out, "scores_out", 0)
    _check(delta, confidence, delta_positive=False)
    m = s_in.size + s_out.size
    if m == 0:
        raise ValueError("scores_in and scores_out: no canary scores at all")
    grid = guess_grid(m)
    significance = (1.0 - confidence) / len(grid)
    best = (0.0, grid[-1], _correct_counts(s_in, s_out, grid[-1:])[0])
    for pair, v in zip(grid, _correct_counts(s_in, s_out, grid), strict=True):
        r = pair[0] + pair[1]
        if best[0] > 0 and _p_values(m, r, v, np.array([best[0]]), delta)[0] > significance:
            continue  # its first non-rejected eps is at most the best so far
        eps = _one_run_epsilon(m, r, v, delta, significance)
        if eps > best[0]:
            best = (eps, pair, v)
    eps, (k_in, k_out), v = best
    return OneRunBound(epsilon=eps, guesses=k_in + k_out, correct=v, m=m, confidence=confidence,
                       method=ONE_RUN_METHOD, guesses_in=k_in, guesses_out=k_out, hypotheses=len(grid), delta=delta)


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
    _check(delta, 0.5, delta_positive=True)
    if sd0 == 0 or sd1 == 0:
        return 0.0 if (sd0 == sd1 and mu0 == mu1) else math.inf
    return float(_pair_epsilons(delta, np.array(mu0), np.array(sd0), np.array(mu1), np.array(sd1)))


def gaussian_estimate(scores_in: object, scores_out: object, delta: float, confidence: float,
                      bootstrap: int = 1000, seed: int = 0) -> GaussianEstimate:
    """Andrew et al.'s one-shot epsilon ESTIMATE (not a bound) from the canaries' scores.

    ``scores_in`` (k,) and ``scores_out`` (m - k,) are each fitted by a Gaussian (mean, sample sd with ddof=1);
    ``epsilon`` = :func:`gaussian_pair_epsilon` of the two fits at ``delta``. [``ci_low``, ``ci_high``]: the
    (1 -/+ confidence)/2 percentiles of ``bootstrap`` re-estimates on canaries resampled with replacement within
    each set (numpy generator seeded by ``seed``; the same inputs give the same interval); ``bootstrap=0`` gives
    the point estimate as both ends. Zero-variance sets follow :func:`gaussian_pair_epsilon` (inf). Raises
    ValueError naming ``scores_in`` / ``scores_out`` when one has fewer than 2 scores or a non-finite one, and for
    delta outside (0, 1), confidence outside (0, 1) or bootstrap < 0.
    """
    s_in, s_out = _scores(scores_in, "scores_in", 2), _scores(scores_out, "scores_out", 2)
    _check(delta, confidence, delta_positive=True)
    if bootstrap < 0:
        raise ValueError(f"bootstrap: {bootstrap} must be >= 0")

    eps = gaussian_pair_epsilon(float(s_out.mean()), float(s_out.std(ddof=1)), float(s_in.mean()),
                                float(s_in.std(ddof=1)), delta)
    lo = hi = eps
    if bootstrap:
        rng = np.random.default_rng(seed)
        b_in = s_in[rng.integers(0, s_in.size, (bootstrap, s_in.size))]
        b_out = s_out[rng.integers(0, s_out.size, (bootstrap, s_out.size))]
        fits = (b_out.mean(1), b_out.std(1, ddof=1), b_in.mean(1), b_in.std(1, ddof=1))
        safe = [np.where(x > 0, x, 1.0) if k % 2 else x for k, x in enumerate(fits)]
        draws = _degenerate_rule(*fits, _pair_epsilons(delta, *safe))
        tail = (1.0 - confidence) / 2
        lo = float(np.quantile(draws, tail, method="lower"))
        hi = float(np.quantile(draws, 1.0 - tail, method="higher"))
    sd_in, sd_out = float(s_in.std(ddof=1)), float(s_out.std(ddof=1))
    pooled = math.sqrt((sd_in**2 + sd_out**2) / 2)
    diff = float(s_in.mean() - s_out.mean())
    mu = diff / pooled if pooled > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return GaussianEstimate(epsilon=eps, ci_low=lo, ci_high=hi, mu=mu, confidence=confidence, delta=delta,
                            method=GAUSSIAN_METHOD, mean_in=float(s_in.mean()), sd_in=sd_in,
                            mean_out=float(s_out.mean()), sd_out=sd_out)
