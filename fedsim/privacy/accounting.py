"""Epsilon of a history of (sub)sampled Gaussian steps, from two independent implementations.

A *history* is a list of ``(sigma, q, steps)``: ``steps`` releases of the Gaussian mechanism with noise
multiplier ``sigma`` (noise std / L2 sensitivity), each on a Poisson sample that holds every record
with probability ``q`` (q = 1: no sampling). It is the shape Opacus's accountants keep
(``accountant.history``) and covers both DP-SGD steps inside a client (records = examples) and
central DP rounds (records = clients). Neighbouring datasets differ by adding or removing one record.

* :func:`opacus_epsilon`: Opacus's ``rdp`` (Mironov, CSF 2017; Mironov, Talwar, Zhang 2019 for the
  sampled Gaussian), ``prv`` (Gopi, Lee, Wutschitz, NeurIPS 2021) or ``gdp`` accountant.
* :func:`dp_accounting_epsilon`: Google's ``dp_accounting`` (a separate code base): ``rdp``
  (``RdpAccountant`` on ``PoissonSampledDpEvent``/``GaussianDpEvent``) or ``pld`` (privacy loss
  distributions, Koskela et al. 2020; Doroshenko et al. 2022), tight up to its discretization
  (:data:`PLD_DISCRETIZATION`, or :data:`PLD_RELATIVE_GRID` times the RDP epsilon when that is
  coarser; rounding is pessimistic, so the figure stays an upper bound).

Both RDP implementations convert to (epsilon, delta) with the same bound (Balle et al. 2020, Prop. 12;
Canonne et al. 2020, eq. 20) over different grids of orders; they agree within 1 % on the histories
fedsim produces (tests check it against both and a closed form). PLD is lower: RDP's conversion is loose.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal

Step = tuple[float, float, int]  # (sigma, q, steps)
PLD_DISCRETIZATION = 1e-3  # privacy-loss grid of the PLD accountant (1e-4 is ~10x slower, same to 0.1 %)
PLD_RELATIVE_GRID = 1e-4  # ...coarsened to this fraction of the RDP epsilon when larger: a tiny sigma
# (1e-3: epsilon ~ 5e5) on a 1e-3 grid needs ~1e9 points and tens of GB; on this grid ~1e4, 0.1 s

_OPACUS_READY = False


def import_opacus() -> None:
    """Import opacus without the root-logger handler its ``logging.basicConfig`` call installs, and
    silence two expected warnings once (not per call: changing filters re-arms every warning):
    PyTorch's "full backward hook is firing" (Opacus hooks on inputs that need no gradient) and RDP's
    "optimal order is the smallest/largest alpha" (an extreme sigma: epsilon is a looser upper bound)."""
    global _OPACUS_READY
    if _OPACUS_READY:
        return
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha", category=UserWarning)
    _OPACUS_READY = True


def merged(history: Iterable[Sequence[float]]) -> tuple[Step, ...]:
    """The history with consecutive entries of equal (sigma, q) merged and step-less ones dropped.

    Composition does not depend on order or grouping, so no epsilon changes; it keeps dp_accounting's
    events small (one ``SelfComposedDpEvent`` per run of equal steps) and cache keys canonical.
    """
    out: list[Step] = []
    for sigma, q, steps in history:
        step = (float(sigma), float(q), int(steps))
        if step[2] <= 0:
            continue
        if out and out[-1][:2] == step[:2]:
            out[-1] = (step[0], step[1], out[-1][2] + step[2])
        else:
            out.append(step)
    return tuple(out)


def _checked(history: Iterable[Sequence[float]], delta: float) -> tuple[Step, ...]:
    steps = merged(history)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, _ in steps:
        if not (sigma >= 0 and 0 <= q <= 1):
            raise ValueError(f"invalid step (sigma={sigma}, q={q}): need sigma >= 0 and 0 <= q <= 1")
    return steps


def _trivial(history: tuple[Step, ...]) -> float | None:
    """0 with no release, inf when a step has no noise (sigma = 0 on a non-empty sample), else None."""
    if not any(q > 0 for _, q, _ in history):
        return 0.0
    if any(sigma == 0 and q > 0 for sigma, q, _ in history):
        return math.inf
    return None


def opacus_epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp",
                   poisson: bool = True) -> float:
    """Epsilon that Opacus's ``accountant`` (``rdp``, ``prv``, ``gdp``) gives ``history`` at ``delta``.

    0 for an empty history, ``inf`` when a step has sigma = 0. ``poisson`` only matters to ``gdp``.
    Raises ``ValueError`` for an invalid delta or step.
    """
    return _opacus(_checked(history, delta), float(delta), accountant, bool(poisson))


@lru_cache(maxsize=512)
def _opacus(history: tuple[Step, ...], delta: float, accountant: str, poisson: bool) -> float:
    trivial = _trivial(history)
    if trivial is not None:
        return trivial
    import_opacus()
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():  # GDP warns that it is experimental on every construction
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "rdp":
            return _opacus_rdp(history, delta)
        acc = create_accountant(mechanism=accountant)
        acc.history = list(history)
        value = acc.get_epsilon(delta, poisson=poisson) if accountant == "gdp" else acc.get_epsilon(delta)
    return float(value)


def _opacus_rdp(history: tuple[Step, ...], delta: float) -> float:
    """Opacus's ``RDPAccountant(history).get_epsilon(delta)``, the same arithmetic with each step's RDP curve
    computed once per (sigma, q) (:func:`_rdp_per_step`) instead of once per call: a run asks after every round,
    and each curve is ~70 series sums (~0.1 s). Opacus sums ``compute_rdp(q, sigma, steps, alphas)``, i.e.
    ``curve * steps``, over the history in order and converts with ``get_privacy_spent``; so does this."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> Any:
    """Opacus's RDP of one sampled Gaussian step at its default orders (``compute_rdp(q, sigma, 1, alphas)``),
    as a read-only array (cached: callers must not change it)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def dp_event(history: Iterable[Sequence[float]]) -> Any:
    """The ``dp_accounting`` event of a history: Poisson-sampled Gaussians, self-composed, composed."""
    import dp_accounting

    events = []
    for sigma, q, steps in merged(history):
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        one = gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(one, steps))
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def dp_accounting_epsilon(history: Iterable[Sequence[float]], delta: float,
                          method: Literal["rdp", "pld"] = "rdp") -> float:
    """Epsilon of ``history`` at ``delta`` from Google's ``dp_accounting`` (add/remove-one neighbours).

    ``rdp``: ``dp_accounting.rdp.RdpAccountant`` (default orders 1.1..1024); ``pld``:
    ``dp_accounting.pld.PLDAccountant`` with :data:`PLD_DISCRETIZATION`. 0 for an empty history,
    ``inf`` when a step has sigma = 0. Raises ``ValueError`` for an invalid delta, step or method.
    """
    if method not in ("rdp", "pld"):
        raise ValueError(f"unknown dp_accounting method {method!r} (rdp or pld)")
    return _dp_accounting(_checked(history, delta), float(delta), method)


@lru_cache(maxsize=512)
def _dp_accounting(history: tuple[Step, ...], delta: float, method: str) -> float:
    trivial = _trivial(history)
    if trivial is not None:
        return trivial
    from dp_accounting import pld, rdp

    if method == "pld":
        bound = _dp_accounting(history, delta, "rdp")
        if math.isinf(bound):
            return bound
        acc = pld.PLDAccountant(value_discretization_interval=max(PLD_DISCRETIZATION, PLD_RELATIVE_GRID * bound))
    else:
        acc = rdp.RdpAccountant()
    event = dp_event(history)
    absl = logging.getLogger("absl")  # RDP logs each fractional order whose series it cannot sum
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    except OverflowError:
        if method != "pld":
            raise
        # a tiny sigma (1e-6: RDP epsilon ~1e4) makes the PLD grid overflow exp(); RDP's epsilon bounds PLD's
        return bound
    finally:
        absl.setLevel(level)


def epsilons(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp",
             poisson: bool = True) -> dict[str, float]:
    """Every figure fedsim prints for one history: ``epsilon`` (Opacus's ``accountant``),
    ``epsilon_dp_accounting_rdp`` and ``epsilon_dp_accounting_pld`` (Google's dp_accounting)."""
    steps = _checked(history, delta)
    return {
        "epsilon": _opacus(steps, float(delta), accountant, bool(poisson)),
        "epsilon_dp_accounting_rdp": _dp_accounting(steps, float(delta), "rdp"),
        "epsilon_dp_accounting_pld": _dp_accounting(steps, float(delta), "pld"),
    }
