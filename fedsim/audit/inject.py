"""Where the audit's canaries enter the federation (issue 15): the hooks the DP paths call.

Every draw comes from :class:`~fedsim.audit.canaries.CanarySet`, seeded by the scenario alone, so the same
scenario and seed insert the same canaries on any backend (in-process or Ray) and in any process.

* Example canaries in Opacus's DP-SGD family (:func:`attach_example_canaries`, called by ``fedsim.defenses.dp_sgd``'s
  round): the included canaries drawn into a batch (at the accounted rate q, from the seed, not by the real
  sampler) are records with a linear loss whose per-example gradient ``F C c_j`` has norm F C, F =
  :data:`~fedsim.audit.canaries.EXAMPLE_NORM_FACTOR` (10) times the clipping norm. Under the modes that
  materialise per-example gradients (``hooks``, ``functorch``, ``ew``) they are appended as extra rows of every
  parameter's ``p.grad_sample`` just before Opacus's ``clip_and_accumulate``, so the optimizer clips them with the
  real records, to its own ``max_grad_norm``: a clip that does not clip, or an optimizer clipping to another norm
  than the accountant's C, lets them move the model by more than C and the audit can see it. Ghost clipping
  (``DPOptimizerFastGradientClipping``) never forms per-example gradients: there the canaries add ``C c_j`` to
  ``p.summed_grad`` after the clipping, in ``add_noise``, and its clipping is NOT exercised by the audit
  (:func:`canaries_clipped_by_mechanism`).
* Example canaries in DIFF2 (replace-one neighbours) are appended by ``fedsim.defenses.diff2_client`` to the restart
  round's per-example gradients before its clip to C1 (:meth:`~fedsim.audit.canaries.CanarySet.signed_rows`).
* Client canaries are client replies added to the server's aggregation: :mod:`fedsim.audit.client_canaries`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedsim.audit.canaries import EXAMPLE_NORM_FACTOR, CanarySet, canaries_for
from fedsim.scenario import Scenario


def canaries_at(scenario: Scenario | None, level: str) -> CanarySet | None:
    """The scenario's canaries when it is audited at ``level`` (``example`` or ``client``), else None."""
    if scenario is None or scenario.audit is None:
        return None
    canaries = canaries_for(scenario)
    return canaries if canaries is not None and canaries.level == level else None


def canaries_clipped_by_mechanism(scenario: Scenario) -> bool | None:
    """Whether the scenario's EXAMPLE canaries go through the mechanism's own per-example clipping: True for
    the dp_sgd family under ``hooks``, ``functorch`` or ``ew`` and for DIFF2 with ``c1`` set; False under ghost
    clipping (the canaries join after it) or DIFF2 without clipping; None when the scenario is not audited at the
    example level (client canaries are another matter)."""
    if canaries_at(scenario, "example") is None:
        return None
    from fedsim.simulation.setup import setup_for

    for d in setup_for(scenario).defenses:
        if getattr(d, "audits_examples", False):
            mode = getattr(d.params, "grad_sample_mode", None)
            if mode is not None:
                return mode not in ("ghost", "bk")  # auto takes hooks under an example-level audit
            return getattr(d.params, "c1", None) is not None
    return None


def attach_example_canaries(optimizer: Any, scenario: Scenario | None, model: nn.Module, partition_id: int,
                            server_round: int, q: float, norm: float, queries_per_step: int = 1,
                            per_sample: bool = True) -> None:
    """Make an Opacus DP optimizer insert client ``partition_id``'s included example canaries (module doc).

    ``optimizer``: a ``DPOptimizer`` (or, ``per_sample`` False, the ghost-clipping subclass) over ``model``'s
    trainable parameters; ``q``: the batch sampling rate (Poisson batches; with fixed-size batches a canary still
    joins each batch with probability q); ``norm``: the per-example clipping norm C the accountant assumes.
    ``per_sample`` True: the canaries' per-example gradients (norm ``EXAMPLE_NORM_FACTOR x norm``) are appended to
    ``p.grad_sample`` before ``clip_and_accumulate`` (the optimizer's clipping brings them to its max_grad_norm);
    False (ghost clipping): ``norm c_j`` each is added to ``p.summed_grad`` before ``add_noise``. Batch ``step``
    of the round is the ``step``-th private query divided by ``queries_per_step``: DP-SAM's two private queries
    on one batch see the SAME canaries, as they see the same records. Empty batches are steps too. Does nothing
    when the scenario is not audited at the example level.
    """
    canaries = canaries_at(scenario, "example")
    if canaries is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    calls = [0]

    def next_step() -> int:
        step = calls[0] // queries_per_step
        calls[0] += 1
        return step

    if per_sample:
        clip_and_accumulate = optimizer.clip_and_accumulate

        def clip_with_canaries() -> None:
            rows = canaries.example_rows(partition_id, server_round, next_step(), q, EXAMPLE_NORM_FACTOR * norm)
            if rows is not None:
                append_rows(optimizer.params, names, canaries.as_rows(rows))
            clip_and_accumulate()

        optimizer.clip_and_accumulate = clip_with_canaries
        return
    add_noise = optimizer.add_noise

    def add_noise_with_canaries() -> None:
        shift = canaries.example_shift(partition_id, server_round, next_step(), q, norm)
        if shift is not None:
            state = canaries.as_state(shift)
            for p in optimizer.params:
                name = names.get(id(p))
                if name in state and p.summed_grad is not None:
                    p.summed_grad.add_(state[name].to(p.summed_grad.device, p.summed_grad.dtype)
                                       .view_as(p.summed_grad))
        add_noise()

    optimizer.add_noise = add_noise_with_canaries


def append_rows(params: list[Tensor], names: Mapping[int, str], rows: Mapping[str, Tensor]) -> None:
    """Append per-example gradient rows (name -> (k, *shape)) to each parameter's ``grad_sample`` (Opacus: a
    (B, *shape) tensor, or a list of them when batches were accumulated: the rows join the last one, so the count
    of accumulated batches, which Opacus's scaling reads, is unchanged); a parameter the rows do not name gains k
    zero rows, so every parameter keeps the same number of examples."""
    k = len(next(iter(rows.values())))
    for p in params:
        held = p.grad_sample
        ref = held[-1] if isinstance(held, list) else held
        row = rows.get(names.get(id(p), ""))
        row = ref.new_zeros((k, *p.shape)) if row is None else row.to(ref.device, ref.dtype).view(k, *p.shape)
        if isinstance(held, list):
            held[-1] = torch.cat([held[-1], row])
        else:
            p.grad_sample = torch.cat([held, row])


__all__ = ["append_rows", "attach_example_canaries", "canaries_at", "canaries_clipped_by_mechanism"]
