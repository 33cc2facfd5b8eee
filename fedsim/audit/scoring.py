"""The ``audit`` block of ``metrics.json``: canary scores from the released models, beside the accountants' epsilon.

:func:`audit_block` scores every canary of the run (:meth:`fedsim.audit.canaries.CanarySet.scores`: the cosine
between c_j and ``final - initial`` global model, the models every DP path releases), splits the scores by the
canaries' in/out coins (ground truth), and puts beside each other:

* ``epsilon``: what the accountants promise for ONE canary's unit (one record of one client at ``example`` level,
  the max over clients' epsilon; one client at ``client`` level), from the run's privacy block
  (:mod:`fedsim.privacy.summary`): Opacus's figure and Google's dp_accounting RDP and PLD (two independent
  implementations). DIFF2: the epsilon of what the server RELEASES (the audit observes released models). ``inf``
  when the canaries' unit has no DP in this run (written ``"inf"``, :mod:`fedsim.jsonio`).
* ``epsilon_lower_bound``: Steinke, Nasr, Jagielski (NeurIPS 2023)'s one-run lower bound at the accountant's delta
  and ``audit.confidence`` (:func:`fedsim.audit.estimators.one_run_lower_bound`). Sound for any score.
* ``epsilon_estimate``: the equal-variance (pooled) Gaussian fit of the scores converted with the mu-GDP closed
  form, with its bootstrap interval (:func:`fedsim.audit.gaussian_fit.pooled_gaussian_estimate`). An ESTIMATE, not
  a bound: above the accountant's epsilon it proves nothing.
* ``epsilon_estimate_two_variance``: Andrew et al. (ICLR 2024)'s two-variance fit
  (:func:`fedsim.audit.gaussian_fit.gaussian_estimate`), biased upward at small delta (its ``note``).
* ``canaries_clipped_by_mechanism``: whether the example canaries' per-example gradients (norm 10 C) went through
  the mechanism's own clipping (dp_sgd family under hooks, functorch, ew; DIFF2 with c1): true, a clip that does
  not clip is visible; false under ghost clipping, whose canaries join after the clip, which the audit then does
  not exercise; null at the client level (:func:`fedsim.audit.inject.canaries_clipped_by_mechanism`).
* ``verdict``: ``violation`` when the lower bound exceeds the SMALLEST accountant epsilon (proof, at
  ``confidence``, that the implementation leaks more than it accounts), else ``consistent``.

``utility``: the last evaluated round's ``test_accuracy`` (null for a regression) and ``test_loss`` (the task's
loss on the test set: MSE for a regression, cross-entropy for a classification) with the canaries, and
``chance_accuracy`` (1 / classes; null for a regression), beside the run without canaries: ``baseline_test_accuracy``,
``accuracy_drop`` (baseline - with), ``baseline_test_loss``, ``loss_increase`` (with - baseline). The baseline
fields are null here; ``fedsim audit`` fills them from its run without canaries (:mod:`fedsim.audit.baseline`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsim.audit.canaries import canaries_for
from fedsim.audit.inject import canaries_clipped_by_mechanism
from fedsim.scenario import Scenario

OBSERVATION = "cosine between each canary and the released model's change (final - initial global model)"
LOWER_BOUND_METHOD = "Steinke et al. 2023 one-run"
TWO_VARIANCE_NOTE = ("biased upward at small delta: sampling noise in the two fitted sds alone inflates it "
                     "(an honest run can show it above the accountant's epsilon); epsilon_estimate is the headline")
DEFAULT_DELTA = 1e-5  # the DP defenses' default delta: the audit's delta when the run has no DP at all
ACCOUNTANTS = ("opacus", "dp_accounting_rdp", "dp_accounting_pld")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def accountant_epsilon(level: str, privacy: Mapping[str, Any]) -> tuple[str, dict[str, float | None], float | None]:
    """(mechanism, {opacus, dp_accounting_rdp, dp_accounting_pld}, delta) for one canary's unit at ``level``.

    ``example``: DIFF2's released epsilon, else the DP-SGD family's max over clients (``dp_sgd``, ``dp_sat`` or
    ``dp_sam``); ``client``: central DP's. Every figure is ``inf`` and the mechanism ``none`` when the run gives
    that unit no DP (delta None then). ``privacy`` is :func:`fedsim.privacy.summary.privacy_summary`'s block.

    Example level, DP-SGD family: client i is (eps_i, delta_i)-DP, so every client is (max eps, max delta)-DP; the
    pair is the largest epsilon with the LARGEST delta (with the smallest delta the pair would be invalid whenever
    the clients' deltas differ: a client's epsilon at a smaller delta than its own is larger than eps_i).
    """
    inf: dict[str, float | None] = dict.fromkeys(ACCOUNTANTS, math.inf)
    if level == "example":
        diff2, sample = privacy.get("diff2"), privacy.get("dp_sgd")
        if diff2:
            return "diff2", _figures(diff2, ""), _number(diff2.get("delta"))
        if sample:
            deltas = [_number(c.get("delta")) for c in (sample.get("clients") or {}).values()]
            delta = max((d for d in deltas if d is not None), default=None)
            return str(sample.get("method", "dp_sgd")), _figures(sample, "_max"), delta
        return "none", inf, None
    central = privacy.get("central_dp")
    if central:
        return "central_dp", _figures(central, ""), _number(central.get("delta"))
    return "none", inf, None


def _figures(block: Mapping[str, Any], suffix: str) -> dict[str, float | None]:
    return {"opacus": _number(block.get(f"epsilon{suffix}")),
            "dp_accounting_rdp": _number(block.get(f"epsilon_dp_accounting_rdp{suffix}")),
            "dp_accounting_pld": _number(block.get(f"epsilon_dp_accounting_pld{suffix}"))}


def smallest_epsilon(epsilon: Mapping[str, float | None]) -> float:
    """The smallest accountant figure (the tightest claim, which a lower bound must not exceed); inf if none."""
    return min((v for v in epsilon.values() if v is not None and not math.isnan(v)), default=math.inf)


def last_accuracy(history: Sequence[Mapping[str, Any]]) -> float | None:
    """``test_accuracy`` of the last evaluated history row (None: a regression, or no evaluation)."""
    return next((_number(r["test_accuracy"]) for r in reversed(history) if "test_accuracy" in r), None)


def last_loss(history: Sequence[Mapping[str, Any]]) -> float | None:
    """``test_loss`` of the last evaluated history row (MSE for a regression; None without evaluation)."""
    return next((_number(r["test_loss"]) for r in reversed(history) if "test_loss" in r), None)


def chance_accuracy(scenario: Scenario) -> float | None:
    """1 / number of classes: the accuracy of a uniform guess (None for a regression task, which has no classes)."""
    from fedsim.simulation.setup import setup_for

    classes = setup_for(scenario).data.num_classes
    return 1.0 / classes if classes else None


def secure_aggregation(scenario: Scenario) -> bool:
    """Whether the server sees only a secure aggregate (a defense switching the federation to SecAgg+)."""
    from fedsim.simulation.setup import setup_for

    return any(getattr(d, "secure_aggregation", False) for d in setup_for(scenario).defenses)


ADAPTIVE_NORM = "per round: the round's adaptive clipping norm C_t (initial {initial:g})"


def canary_norm(scenario: Scenario, level: str) -> float | str:
    """C, the norm of one canary's contribution once the mechanism has clipped it (the sensitivity the accountant
    assumes; the canaries' raw gradients / updates are larger, so that the mechanism's own clip must act:
    :mod:`fedsim.audit.inject`, :mod:`fedsim.audit.client_canaries`). ``example`` level: the per-example clipping
    norm of the sample-level DP defense (dp_sgd family: ``max_grad_norm``; diff2: ``c1``, 1.0 when unclipped).
    ``client`` level under central DP: its fixed ``clipping_norm`` (``audit.client_norm`` when that is smaller:
    nothing to clip then); under its ADAPTIVE clipping the canaries of round t are clipped to that round's norm
    C_t (``fedsim.defenses.central_dp``'s ``round_clipping_norm``), which changes every round: the text
    :data:`ADAPTIVE_NORM` (with the initial norm) says so instead of one number. Without central DP:
    ``audit.client_norm``, else 1.0."""
    from fedsim.simulation.setup import setup_for

    defenses = setup_for(scenario).defenses
    if level == "example":
        for d in defenses:
            p = d.params
            if getattr(d, "audits_examples", False):
                return float(getattr(p, "max_grad_norm", None) or getattr(p, "c1", None) or 1.0)
        return 1.0
    raw = scenario.audit.client_norm if scenario.audit is not None else None
    for d in defenses:
        if d.name == "central_dp":
            p = d.params
            if p.clipping == "adaptive":
                return ADAPTIVE_NORM.format(initial=p.initial_clipping_norm)
            return float(min(p.clipping_norm, raw) if raw is not None else p.clipping_norm)
    return float(raw) if raw is not None else 1.0


def _get(result: Any, key: str) -> Any:
    return result[key] if isinstance(result, Mapping) else getattr(result, key)


def _estimate(est: Any) -> dict[str, Any]:
    return {"value": float(_get(est, "epsilon")), "ci": [float(_get(est, "ci_low")), float(_get(est, "ci_high"))],
            "method": str(_get(est, "method"))}


def estimate_or_reason(fit: Any, scores_in: Any, scores_out: Any, delta: float, confidence: float,
                       method: str) -> dict[str, Any]:
    """``_estimate(fit(...))``, or, when a Gaussian fit is impossible (fewer than 2 canaries drawn in, or out: the
    coins are Bernoulli(1/2), so this happens with probability about m * 2^(1-m)), ``value`` None, ``ci`` [None,
    None] and ``not_estimated`` saying why: the run's other numbers (the bound, the accountants) still stand."""
    n_in, n_out = len(scores_in), len(scores_out)
    if min(n_in, n_out) < 2:
        return {"value": None, "ci": [None, None], "method": method,
                "not_estimated": f"a Gaussian fit needs at least 2 canaries on each side; {n_in} were drawn in, "
                                 f"{n_out} out"}
    return _estimate(fit(scores_in, scores_out, delta, confidence))


def audit_block(scenario: Scenario, initial_state: Mapping[str, torch.Tensor], final_state: Mapping[str, torch.Tensor],
                history: Sequence[Mapping[str, Any]], privacy: Mapping[str, Any]) -> dict[str, Any]:
    """The ``audit`` block of ``metrics.json`` for a run of ``scenario`` (which must have ``audit:``).

    ``initial_state`` / ``final_state``: the global model before round 1 and after the last round (state dicts);
    ``history``: the server's rows; ``privacy``: the run's privacy block. Schema: the module docstring and
    ``/work/helper_rules.md``. Raises ``ValueError`` without an ``audit:`` block.
    """
    from fedsim.audit.estimators import one_run_lower_bound
    from fedsim.audit.gaussian_fit import gaussian_estimate, pooled_gaussian_estimate

    canaries = canaries_for(scenario)
    if canaries is None or scenario.audit is None:
        raise ValueError("audit_block needs a scenario with an audit: block")
    spec = scenario.audit
    scores = canaries.scores(initial_state, final_state)
    included = canaries.included
    scores_in, scores_out = scores[included], scores[~included]
    mechanism, epsilon, delta = accountant_epsilon(canaries.level, privacy)
    delta = DEFAULT_DELTA if delta is None else delta
    bound = one_run_lower_bound(scores_in, scores_out, delta, spec.confidence)
    from fedsim.audit.gaussian_fit import GAUSSIAN_METHOD, POOLED_METHOD

    estimate = estimate_or_reason(pooled_gaussian_estimate, scores_in, scores_out, delta, spec.confidence,
                                  POOLED_METHOD)
    two = estimate_or_reason(gaussian_estimate, scores_in, scores_out, delta, spec.confidence, GAUSSIAN_METHOD)
    lower = float(_get(bound, "epsilon"))
    return {
        "level": canaries.level, "mechanism": mechanism, "secure_aggregation": secure_aggregation(scenario),
        "canaries": canaries.m, "canaries_in": int(included.sum()),
        "canary_norm": canary_norm(scenario, canaries.level),
        "canaries_clipped_by_mechanism": canaries_clipped_by_mechanism(scenario),
        "observation": OBSERVATION, "confidence": spec.confidence, "delta": delta,
        "epsilon": epsilon,
        "epsilon_lower_bound": {"value": lower, "method": LOWER_BOUND_METHOD,
                                "guesses": int(_get(bound, "guesses")), "correct": int(_get(bound, "correct"))},
        "epsilon_estimate": estimate,
        "epsilon_estimate_two_variance": {**two, "note": TWO_VARIANCE_NOTE},
        "verdict": "violation" if lower > smallest_epsilon(epsilon) else "consistent",
        "utility": {"test_accuracy": last_accuracy(history), "baseline_test_accuracy": None, "accuracy_drop": None,
                    "chance_accuracy": chance_accuracy(scenario), "test_loss": last_loss(history),
                    "baseline_test_loss": None, "loss_increase": None},
        "scores": {"in": [float(s) for s in scores_in], "out": [float(s) for s in scores_out]},
    }
