"""DIFF2 noise calibration and privacy accounting (Murata & Suzuki, ICML 2023; spec: algorithms-more.md §9.3).

Pure functions: no plug-in import (``defenses/diff2.py`` and ``fedsim.privacy.summary`` call them).

**Mechanisms.** DIFF2 releases, every round r = 0..R-1, the clients' mean message plus Gaussian noise:

* restart rounds (r mod T == 0; there are ``ceil(R / T)`` of them): the mean of the clients' clipped full
  gradients, L2 sensitivity ``2 C1 / (n_min P)`` under replace-one adjacency of one record of one client,
  noise std ``C1 sigma1`` per coordinate;
* difference rounds (the other ``R - ceil(R / T)``): the mean of clipped per-sample gradient differences,
  sensitivity ``2 C2 dx_r / (n_min P)``, noise std ``C2 dx_r sigma2`` (dx_r = ||x_r - x_{r-1}||, itself a DP
  output, so the data-dependent radius costs nothing).

Each is a Gaussian mechanism with noise multiplier (std / sensitivity) ``z1 = sigma1 n_min P / 2`` or
``z2 = sigma2 n_min P / 2``, whatever C1, C2 and dx_r are. No subsampling: every record is used every round.

**Three figures.**

* :func:`closed_form_epsilon`: the authors' bound. RDP of a Gaussian at order alpha is ``alpha / (2 z^2)``
  (Mironov 2017, Prop. 7); summed over the rounds and converted with ``eps <= eps_RDP(alpha) + ln(1/delta) /
  (alpha - 1)`` (Mironov 2017, Prop. 3) at the single order ``alpha = 1 + ceil(2 ln(1/delta) / eps)``.
* :func:`exact_epsilon`: the tight figure. A composition of Gaussian mechanisms without sampling is exactly
  one Gaussian mechanism with ``mu = sqrt(sum_i 1 / z_i^2)`` (mu-GDP, Dong, Roth & Su 2022, Cor. 3.3), whose
  (eps, delta) curve is ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang, ICML
  2018, Thm. 8); solved for eps here.
* :func:`accounted` runs the same sequence through accountants: Opacus RDP, Google's dp_accounting RDP and
  PLD (:func:`fedsim.privacy.accounting.epsilons`). PLD matches :func:`exact_epsilon` (both tight); the RDP
  figures are looser (their order-wise conversion), and match each other.

**Calibration** (:func:`closed_form_sigmas`, the authors' code): ``alpha = 1 + ceil(2 ln(1/delta)/eps)``,
``u = 1.25``, ``sigma1 = sqrt(c1 alpha R / (T n_min^2 P^2 eps))`` with ``c1 = 4u`` (T > 1) or 4 (T = 1),
``sigma2 = sqrt((4u / (u - 1)) alpha R / (n_min^2 P^2 eps))``. The authors count R / T restarts; fedsim
counts ``ceil(R / T)`` (``authors_count=False``, the default), which is never fewer. Their difference
budget counts all R rounds (conservative), kept here. :func:`rdp_calibrated` rescales both sigmas so that the
RDP epsilon (not the looser closed form) meets the target, for comparisons with DP-SGD at matched epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.privacy.accounting import epsilons, opacus_epsilon

U_SPLIT = 1.25  # the authors' budget split between restarts and differences (hard-coded in their code)


def rdp_order(epsilon: float, delta: float) -> int:
    """The authors' RDP order ``alpha = 1 + ceil(2 ln(1/delta) / epsilon)``."""
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    return 1 + math.ceil(2 * math.log(1 / delta) / epsilon)


def restarts(rounds: int, restart_period: int) -> int:
    """Restart rounds among ``rounds`` (rounds 0, T, 2T, ...): ``ceil(R / T)``."""
    return math.ceil(rounds / restart_period)


def noise_multiplier(sigma: float, n_min: int, clients: int) -> float:
    """``z = sigma n_min P / 2``: noise std ``C sigma`` over the replace-one sensitivity ``2 C / (n_min P)``."""
    return sigma * n_min * clients / 2


@dataclass(frozen=True)
class Calibration:
    """The authors' noise scales for a target epsilon (:func:`closed_form_sigmas`)."""

    sigma1: float
    sigma2: float  # used by difference rounds only (none when T = 1)
    alpha: int


def closed_form_sigmas(epsilon: float, delta: float, rounds: int, restart_period: int, n_min: int, clients: int,
                       *, u: float = U_SPLIT, authors_count: bool = False) -> Calibration:
    """sigma1, sigma2 and alpha of spec §9.3 for a target ``epsilon`` (dimensionless: noise std / clip).

    ``authors_count``: R / T restarts as in the authors' code (reproduces their table); default ceil(R / T).
    Raises ValueError for a non-positive epsilon, a delta outside (0, 1) or empty counts.
    """
    if min(rounds, restart_period, n_min, clients) < 1:
        raise ValueError("rounds, restart_period, n_min and clients must be >= 1")
    alpha = rdp_order(epsilon, delta)
    c1 = 4 * u if restart_period > 1 else 4.0
    count = rounds / restart_period if authors_count else restarts(rounds, restart_period)
    scale = alpha / (n_min**2 * clients**2 * epsilon)
    return Calibration(sigma1=math.sqrt(c1 * count * scale),
                       sigma2=math.sqrt(4 * u / (u - 1) * rounds * scale), alpha=alpha)


def closed_form_epsilon(z1: float, z2: float, n_restarts: float, n_differences: float, delta: float,
                        alpha: float) -> float:
    """The authors' (eps, delta) bound at one RDP order: ``alpha (n_restarts / (2 z1^2) + n_differences /
    (2 z2^2)) + ln(1/delta) / (alpha - 1)``; inf when a used mechanism has no noise."""
    rdp = 0.0
    for z, count in ((z1, n_restarts), (z2, n_differences)):
        if count > 0:
            if z <= 0:
                return math.inf
            rdp += alpha * count / (2 * z * z)
    return rdp + math.log(1 / delta) / (alpha - 1)


def composed_mu(steps: list[tuple[float, float]]) -> float:
    """mu of the Gaussian equivalent to ``steps`` = [(noise multiplier z, count)]: ``sqrt(sum count / z^2)``."""
    total = 0.0
    for z, count in steps:
        if count > 0:
            if z <= 0:
                return math.inf
            total += count / (z * z)
    return math.sqrt(total)


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(eps) of a mu-GDP Gaussian mechanism (Balle & Wang 2018, Thm. 8), in log space for stability."""
    from scipy.special import log_ndtr

    a = log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr(-epsilon / mu - mu / 2)
    return float(math.exp(a) - math.exp(b)) if b < a else 0.0


def exact_epsilon(mu: float, delta: float) -> float:
    """The smallest eps >= 0 with ``gaussian_delta(eps, mu) <= delta`` (0 when mu = 0, inf when mu = inf)."""
    from scipy.optimize import brentq

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu == 0 or gaussian_delta(0.0, mu) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def history(z1: float, z2: float, n_restarts: int, n_differences: int) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) history of :mod:`fedsim.privacy.accounting`: q = 1, no sampling."""
    return [(z1, 1.0, n_restarts), (z2, 1.0, n_differences)]


def accounted(z1: float, z2: float, n_restarts: int, n_differences: int, delta: float) -> dict[str, float]:
    """Every accountant's epsilon for the sequence: ``epsilon`` (Opacus RDP), ``epsilon_dp_accounting_rdp``,
    ``epsilon_dp_accounting_pld`` and ``epsilon_exact`` (:func:`exact_epsilon`)."""
    out = epsilons(history(z1, z2, n_restarts, n_differences), delta, "rdp")
    out["epsilon_exact"] = exact_epsilon(composed_mu([(z1, n_restarts), (z2, n_differences)]), delta)
    return out


def rdp_epsilon(z1: float, z2: float, n_restarts: int, n_differences: int, delta: float) -> float:
    """Opacus's RDP epsilon of the sequence (cheap: the per-round figure of the server's history rows)."""
    return opacus_epsilon(history(z1, z2, n_restarts, n_differences), delta, "rdp")


def rdp_calibrated(cal: Calibration, epsilon: float, delta: float, rounds: int, restart_period: int, n_min: int,
                   clients: int) -> Calibration:
    """``cal`` with both sigmas scaled by one factor so that Opacus's RDP epsilon of the run (ceil(R/T) restarts,
    the rest differences) equals ``epsilon`` (relative tolerance 1e-6): the same accountant DP-SGD's
    ``target_epsilon`` is solved with, for comparisons at matched epsilon. The closed form is an upper bound
    of that epsilon, so the factor is <= 1 (less noise)."""
    n_res = restarts(rounds, restart_period)
    n_diff = rounds - n_res

    def eps_at(k: float) -> float:
        return rdp_epsilon(noise_multiplier(k * cal.sigma1, n_min, clients),
                           noise_multiplier(k * cal.sigma2, n_min, clients), n_res, n_diff, delta)

    lo, hi = 1.0, 1.0
    while eps_at(lo) < epsilon:
        lo /= 2
    while eps_at(hi) > epsilon:
        hi *= 2
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps_at(mid) > epsilon else (lo, mid)
    return Calibration(sigma1=hi * cal.sigma1, sigma2=hi * cal.sigma2, alpha=cal.alpha)


def local_noise_multiplier(sigma: float, n_p: int, clients: int) -> float:
    """z of ONE client's locally noised message against the server that reads it: noise std ``sqrt(P) C sigma``
    over its own replace-one sensitivity ``2 C / n_p`` = ``sqrt(P) sigma n_p / 2``."""
    return math.sqrt(clients) * sigma * n_p / 2
