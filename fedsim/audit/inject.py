"""Where the audit's canaries enter the federation (issue 15): the hooks the DP paths call.

Every draw comes from :class:`~fedsim.audit.canaries.CanarySet`, seeded by the scenario alone, so the same
scenario and seed insert the same canaries on any backend (in-process or Ray) and in any process.

* Example canaries in Opacus's DP-SGD family (:func:`attach_example_canaries`, called by ``defenses.dp_sgd``'s
  round): the included canaries drawn into a Poisson batch add ``C c_j`` to each parameter's clipped sum
  ``p.summed_grad`` just before the optimizer adds its noise (the canary is a record with a linear loss: its
  gradient ``C c_j`` has norm C, so clipping leaves it as it is). ``DPOptimizer`` and the ghost-clipping
  ``DPOptimizerFastGradientClipping`` both read ``p.summed_grad`` in ``add_noise``, which is wrapped here.
* Example canaries in DIFF2 (replace-one neighbours) are added by ``defenses.diff2_client`` itself
  (:meth:`~fedsim.audit.canaries.CanarySet.signed_shift`).
* Client canaries (:func:`client_canary_shift`): what the included canary clients add to the server's mean of
  the K sampled updates (fedavg: the mean model; fedsgd: the mean gradient), on the plain strategy
  (:class:`fedsim.simulation.strategies.FedSimFedAvg`, inside a central-DP wrapper: after its clipping, before its
  noise) and on the SecAgg+ path (the unmasked aggregate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from fedsim.audit.canaries import CanarySet, canaries_for
from fedsim.scenario import Scenario


def canaries_at(scenario: Scenario | None, level: str) -> CanarySet | None:
    """The scenario's canaries when it is audited at ``level`` (``example`` or ``client``), else None."""
    if scenario is None or scenario.audit is None:
        return None
    canaries = canaries_for(scenario)
    return canaries if canaries is not None and canaries.level == level else None


def attach_example_canaries(optimizer: Any, scenario: Scenario | None, model: nn.Module, partition_id: int,
                            server_round: int, q: float, norm: float, queries_per_step: int = 1) -> None:
    """Make an Opacus DP optimizer insert client ``partition_id``'s included example canaries (module doc).

    ``optimizer``: a ``DPOptimizer`` (or the ghost-clipping subclass) over ``model``'s trainable parameters;
    ``q``: the batch sampling rate (Poisson batches; with fixed-size batches a canary still joins each batch with
    probability q); ``norm``: the per-example clipping norm C (the canary's gradient norm). Batch ``step`` of the
    round is the ``step``-th call of ``add_noise`` divided by ``queries_per_step``: DP-SAM's two private queries on
    one batch see the SAME canaries, as they see the same records. Empty batches are steps too (their add_noise
    runs). Does nothing when the scenario is not audited at the example level.
    """
    canaries = canaries_at(scenario, "example")
    if canaries is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    add_noise = optimizer.add_noise
    calls = [0]

    def add_noise_with_canaries() -> None:
        step = calls[0] // queries_per_step
        calls[0] += 1
        shift = canaries.example_shift(partition_id, server_round, step, q, norm)
        if shift is not None:
            state = canaries.as_state(shift)
            for p in optimizer.params:
                name = names.get(id(p))
                if name in state and p.summed_grad is not None:
                    p.summed_grad.add_(state[name].to(p.summed_grad.device, p.summed_grad.dtype)
                                       .view_as(p.summed_grad))
        add_noise()

    optimizer.add_noise = add_noise_with_canaries


def client_canary_norm(scenario: Scenario, clipping_norm: Callable[[], float] | None) -> float:
    """C of the client canaries: the clipping norm of the round (``clipping_norm``, set by a defense that clips the
    clients' updates, e.g. central_dp), else ``audit.client_norm``, else 1.0."""
    if clipping_norm is not None:
        return float(clipping_norm())
    spec = scenario.audit
    return float(spec.client_norm) if spec is not None and spec.client_norm is not None else 1.0


def client_canary_shift(scenario: Scenario, server_round: int,
                        clipping_norm: Callable[[], float] | None = None) -> dict[str, Tensor] | None:
    """What the included client canaries taking part in ``server_round`` add to the server's mean of the K
    sampled updates: ``(C / K) sum c_j`` (parameter name -> float32 CPU tensor), each canary taking part with the
    clients' rate q = K / N; None when the scenario is not audited at the client level or none takes part.

    K = ``federation.sampled_per_round`` (the mean's denominator; central DP's noise sigma C / K is calibrated to
    it), C = :func:`client_canary_norm`.
    """
    canaries = canaries_at(scenario, "client")
    if canaries is None:
        return None
    fed = scenario.federation
    k = fed.sampled_per_round
    shift = canaries.client_shift(server_round, k / fed.clients, client_canary_norm(scenario, clipping_norm), k)
    return None if shift is None else canaries.as_state(shift)


def shifted(state: Mapping[str, Tensor], shift: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``state`` with ``shift`` added to the entries it names (each cast to the entry's dtype and device)."""
    out = dict(state)
    for k, v in (shift or {}).items():
        if k in out:
            out[k] = out[k] + v.to(out[k].device, out[k].dtype).view_as(out[k])
    return out


__all__ = ["attach_example_canaries", "canaries_at", "client_canary_norm", "client_canary_shift", "shifted"]
