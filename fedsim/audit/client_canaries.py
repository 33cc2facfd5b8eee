"""Client canaries (Andrew et al., arXiv 2302.03098): synthetic clients whose replies join the server's aggregation.

Canary j is an honest client whose local training always returns the update ``norm * c_j`` (c_j its unit
direction, :class:`~fedsim.audit.canaries.CanarySet`). An included canary takes part in a round with the clients'
rate q = K / N (K = ``federation.sampled_per_round``, N = ``federation.clients``), drawn from the seed labels
``(seed, "audit", "clients", round)``, as any client of a Poisson-sampled population would.

On the plain (Flower Message API) path the canaries enter as REAL client replies (:class:`CanaryClients`, the
OUTERMOST strategy wrapper, around every defense's wrapper such as central DP's): its ``aggregate_train`` appends
one reply per canary taking part to the round's real replies and hands them all to the wrapped strategy, so a
canary goes through everything a real reply goes through on the server: the DP wrapper's clipping (``side:
server``), the strategy's weighting, the noise, the adaptive clipping norm's count. With ``side: client`` the
canary reply is what an honest client sends: the defenses' client mods (Flower's ``fixedclipping_mod`` /
``adaptiveclipping_mod``) run on it, with the round's instruction (its clipping norm) as their input, so it is
clipped there and carries the norm bit adaptive clipping needs.

* Update norm: ``audit.client_norm``, else :data:`CLIENT_NORM_FACTOR` times the clipping norm of the round (the
  ``clipping_norm`` of the wrapped strategy chain, read when the round is configured: Flower's DP wrappers), else
  1.0 without a clipping wrapper. ABOVE the clipping norm, so a clip that does not clip shows in the audit.
* Declared ``num-examples``: the sum of the round's real replies' ``num-examples`` (a client holding as much data
  as the sampled clients together: legal). Under central DP's UNIFORM mean each canary weighs 1 / (K + k) (k
  canaries in the round); under a num-examples-weighted mean (the calibration bug of a weighted average) it
  weighs 1 / (k + 1): when k < K - 1 the canary moves the model by more than the accounted C / K and the audit
  can see it. Its other metrics are copies of a real reply's (only the aggregate of train metrics reads them,
  and fedsim does not use that aggregate).
* Denominator, and why the audit stays sound: the uniform mean's denominator is the number of replies, K + k, not
  K, while central DP's noise stays sigma C / K (Flower's wrappers compute it from ``num_sampled_clients``). One
  canary therefore moves the released model by at most C / (K + k) <= C / K: no more than one client of the
  accounted mechanism (Poisson sampling at q, sensitivity C / K, sigma C / K), so a correct implementation gives
  a lower bound below the accountant's epsilon. The audit's power drops by (K + k) / K against the old injection
  of C / K per canary, the price of letting the canaries through the real weighting.
* Never seen by attacks or participation: the replies are made inside the strategy, after the capture proxy has
  returned the real replies; they are not failures and not participation. Flower's DP wrappers warn when the
  reply count differs from K; that warning is dropped while canary replies are present (they are the reason).

Under SecAgg+ (:mod:`fedsim.simulation.secure`) no client-level DP exists (central DP needs the plain path), so
the canaries are added to the unmasked aggregate as ``(norm / K) sum c_j`` (:func:`client_canary_shift`): there
is no clipping or DP weighting for them to go through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import reduce
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import CLIENTS_DISCREPANCY_WARNING
from torch import Tensor

from fedsim.audit.canaries import CanarySet, canaries_for
from fedsim.errors import SimulationError
from fedsim.scenario import Scenario
from fedsim.seeding import numpy_rng
from fedsim.simulation import keys

CLIENT_NORM_FACTOR = 10.0  # a canary's update norm: this times the round's clipping norm (audit.client_norm overrides)

__all__ = ["CLIENT_NORM_FACTOR", "CanaryClients", "client_canaries", "client_canary_shift", "participants",
           "shifted", "wrap_with_client_canaries"]


def client_canaries(scenario: Scenario | None) -> CanarySet | None:
    """The scenario's canaries when it is audited at the client level, else None."""
    if scenario is None or scenario.audit is None:
        return None
    canaries = canaries_for(scenario)
    return canaries if canaries is not None and canaries.level == "client" else None


def participants(canaries: CanarySet, server_round: int) -> list[int]:
    """The INCLUDED canaries taking part in ``server_round``: each with the clients' rate q = K / N, from the seed
    labels ``(seed, "audit", "clients", server_round)`` (one uniform per canary, in order)."""
    fed = canaries.scenario.federation
    part = numpy_rng(canaries.scenario.seed, "audit", "clients", server_round).random(canaries.m) < (
        fed.sampled_per_round / fed.clients)
    return [j for j in range(canaries.m) if part[j] and canaries.included[j]]


def client_canary_shift(scenario: Scenario, server_round: int) -> dict[str, Tensor] | None:
    """SecAgg+ path only: what the round's canaries add to the unmasked aggregate, ``(C / K) sum c_j`` over
    :func:`participants` (parameter name -> float32 CPU tensor), C = ``audit.client_norm`` or 1.0; None when the
    scenario is not audited at the client level or no canary takes part. (No clipping exists there to go through.)
    """
    canaries = client_canaries(scenario)
    if canaries is None or scenario.audit is None:
        return None
    norm = float(scenario.audit.client_norm or 1.0)
    k = scenario.federation.sampled_per_round
    shift = canaries.combination({j: norm / k for j in participants(canaries, server_round)})
    return None if shift is None else canaries.as_state(shift)


def shifted(state: Mapping[str, Tensor], shift: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``state`` with ``shift`` added to the entries it names (each cast to the entry's dtype and device)."""
    out = dict(state)
    for k, v in (shift or {}).items():
        if k in out:
            out[k] = out[k] + v.to(out[k].device, out[k].dtype).view_as(out[k])
    return out


def _chain(strategy: Any) -> Iterable[Any]:
    """``strategy`` and every strategy it wraps (Flower's wrappers keep the wrapped one in ``.strategy``)."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def _first(strategy: Any, attribute: str) -> Any:
    return next((getattr(s, attribute) for s in _chain(strategy) if hasattr(s, attribute)), None)


class _DropCountWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != CLIENTS_DISCREPANCY_WARNING


class CanaryClients(Strategy):
    """Delegating strategy wrapper that adds the round's canary clients to the real replies (module doc).

    ``strategy``: the fully wrapped server strategy (defenses' wrappers included); ``mods``: the client mods of
    the scenario's defenses (an honest client runs them on its reply), in ClientApp order.
    """

    def __init__(self, strategy: Strategy, scenario: Scenario, canaries: CanarySet,
                 mods: list[Callable[..., Message]]) -> None:
        super().__init__()
        self.strategy, self.scenario, self.canaries, self.mods = strategy, scenario, canaries, mods
        self.instruction: RecordDict | None = None  # what the round's clients were sent (a copy)
        self.norm = 1.0  # the canaries' update norm this round

    def round_norm(self) -> float:
        """``audit.client_norm``, else CLIENT_NORM_FACTOR x the wrapped chain's ``clipping_norm`` now, else 1.0."""
        spec = self.scenario.audit
        if spec is not None and spec.client_norm is not None:
            return float(spec.client_norm)
        clip = _first(self.strategy, "clipping_norm")
        return 1.0 if clip is None else CLIENT_NORM_FACTOR * float(clip)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.instruction, self.norm = None, self.round_norm()
        if messages:
            content = messages[0].content
            self.instruction = RecordDict({keys.ARRAYS: ArrayRecord(content[keys.ARRAYS].to_torch_state_dict()),
                                           keys.CONFIG: ConfigRecord(dict(content[keys.CONFIG]))})
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        real = [r for r in replies if not r.has_error()]
        taking_part = participants(self.canaries, server_round)
        if not real or not taking_part or self.instruction is None:
            return self.strategy.aggregate_train(server_round, replies)
        weight_key = _first(self.strategy, "weighted_by_key") or keys.NUM_EXAMPLES
        declared = sum(int(r.content[keys.METRICS][weight_key]) for r in real)
        extra = [self.canary_reply(j, real[0], weight_key, declared) for j in taking_part]
        flower = logging.getLogger("flwr")
        drop = _DropCountWarning()
        flower.addFilter(drop)
        try:
            return self.strategy.aggregate_train(server_round, replies + extra)
        finally:
            flower.removeFilter(drop)

    def canary_reply(self, j: int, template: Message, weight_key: str, declared: int) -> Message:
        """Canary j's reply to this round's instruction, through the client mods (module doc): ``template`` is a
        real reply (its array names and dtypes, its metric names), ``declared`` the canary's ``weight_key``.
        Raises SimulationError when a mod turns it into an error reply."""
        assert self.instruction is not None
        shipped = template.content[keys.ARRAYS].to_torch_state_dict()
        update = self.canaries.as_state(self.canaries.direction(j) * self.norm)
        fedavg = self.scenario.federation.protocol == "fedavg"
        current = self.instruction[keys.ARRAYS].to_torch_state_dict()
        arrays = {}
        for name, like in shipped.items():
            base = current[name].to(like.dtype) if fedavg else torch.zeros_like(like)
            arrays[name] = base + update[name].to(like.dtype) if name in update else base
        metrics = {**dict(template.content[keys.METRICS]), weight_key: declared}

        def train(msg: Message, ctx: Context) -> Message:
            return Message(RecordDict({keys.ARRAYS: ArrayRecord(arrays), keys.METRICS: MetricRecord(metrics)}),
                           dst_node_id=0, message_type=MessageType.TRAIN)

        app = reduce(lambda inner, mod: (lambda m, c, _mod=mod, _in=inner: _mod(m, c, _in)), reversed(self.mods),
                     train)
        msg = Message(RecordDict(dict(self.instruction.items())), dst_node_id=0, message_type=MessageType.TRAIN)
        reply = app(msg, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        if reply.has_error():  # a DP wrapper would silently skip the whole round's aggregation: say why instead
            raise SimulationError(f"audit: client canary {j}'s reply failed in the client mods: {reply.error.reason}")
        return reply

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def wrap_with_client_canaries(strategy: Strategy, scenario: Scenario, defenses: list[Any]) -> Strategy:
    """``strategy`` wrapped by :class:`CanaryClients` when ``scenario`` is audited at the client level, else as is.
    Call it after every defense has wrapped the strategy (the canaries must go through their wrappers)."""
    canaries = client_canaries(scenario)
    if canaries is None:
        return strategy
    mods = [mod for d in defenses for mod in d.client_mods()]
    return CanaryClients(strategy, scenario, canaries, mods)
