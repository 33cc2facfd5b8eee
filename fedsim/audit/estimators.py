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
The Gaussian-fit ESTIMATES (pooled and two-variance) are in :mod:`fedsim.audit.gaussian_fit`; both reuse this
module's input checks (:func:`as_scores`, :func:`check_levels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import bdtrc, expit, logit

ONE_RUN_METHOD = "Steinke et al. 2023 one-run"
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


# ------------------------------------------------------------------------------------------------ checks
def as_scores(values: object, name: str, minimum: int) -> np.ndarray:
    """``values`` as a float64 (n,) array; ValueError naming ``name`` if n < ``minimum`` or a score is not finite."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size < minimum:
        raise ValueError(f"{name}: {arr.size} scores, need at least {minimum}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {int(np.sum(~np.isfinite(arr)))} scores are not finite")
    return arr


def check_levels(delta: float, confidence: float, delta_positive: bool) -> None:
    """ValueError unless delta is in (0, 1) (``delta_positive``) or [0, 1), and confidence in (0, 1)."""
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
    s_in, s_out = as_scores(scores_in, "scores_in", 0), as_scores(scores_out, "scores_out", 0)
    check_levels(delta, confidence, delta_positive=False)
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
