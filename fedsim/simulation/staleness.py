"""Slow clients whose updates are ``tau`` rounds stale, and the server's rules for aggregating them.

The setting of Wang & Gao, "Tackling Intertwined Data and Device Heterogeneities in Federated Learning with
Unlimited Staleness" (AAAI 2025), as the authors' code simulates it (spec ``algorithms-more.md`` §12.1):
synchronous rounds with a model-version lag, not real asynchrony.

* **Models.** ``w^0`` is the initial global model and ``w^r`` the model after round r, so in round t the current
  model is ``w^{t-1}``. A slow client sampled in round t trains from ``w^{t-1-tau}`` (the model ``tau`` rounds
  older than the current one, which the server kept) and its result is aggregated in that same round t.
* **Before the lag exists** (rounds t <= tau: there is no ``w^{t-1-tau}``) a slow client trains from the current
  model, as in the authors' code, where the delay is "active from round tau onwards" (``epoch >= delay``).
* **Who trains.** ``schedule: sampled`` is fedsim's seeded sample per round; ``round_robin`` is the paper's: in round
  t the clients ``(t-1)m, ..., (t-1)m + m-1`` (mod N) with m = clients per round, so each trains every N/m rounds.
* **Rules** (spec §12.3, the authors' ``dc`` flag). With ``delta = w_i - w^{t-1-tau}`` (what the slow client sent,
  minus the model it was sent) and ``w = w^{t-1}``, the slow client's model in the mean is replaced by
  ``direct``: ``w + delta``; ``downweight``: ``w + 2^(-tau/20) delta``; ``dc_asgd`` (Zheng et al., ICML 2017, as
  the authors' code writes it): ``w + delta - lambda delta*delta*(w - w^{t-1-tau})`` (elementwise; lambda is
  DC-ASGD's lambda/eta for a client step of size eta); ``no_staleness``: the reference run, in which slow clients
  are sent the current model and nothing is stale. Then the usual (num-examples weighted) FedAvg mean.
  ``gi_conversion``: the gradient-inversion repair of spec §12.2 (:mod:`fedsim.simulation.stale_gi`; it uses the
  arrival's per-client ``memory`` for its warm start). A new rule is one more entry of :data:`STALE_RULES`.

The server knows each reply's lag (it chose which model to send), so the capture records the model a slow client
really trained from as its ``global_state`` and the lag as ``staleness`` (:mod:`fedsim.simulation.capture`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario, StalenessSpec
from fedsim.seeding import numpy_rng
from fedsim.simulation.stale_gi import check_gi, gi_conversion


def round_robin(round_num: int, num_clients: int, per_round: int) -> list[int]:
    """The paper's schedule: partition ids ``(round_num-1)*per_round + j`` mod ``num_clients`` for j < per_round
    (sorted)."""
    start = (round_num - 1) * per_round
    return sorted({(start + j) % num_clients for j in range(per_round)})


def sample_partitions(seed: int, round_num: int, num_clients: int, per_round: int) -> list[int]:
    """Partition ids that train in ``round_num`` (sorted; all of them when per_round == num_clients), drawn
    from (seed, round) alone so every backend and run samples the same clients."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, "client-sampling", round_num)
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def round_partitions(scenario: Scenario, round_num: int) -> list[int]:
    """Who trains in ``round_num``: the staleness block's round-robin, else the seeded sample."""
    fed = scenario.federation
    if fed.staleness is not None and fed.staleness.schedule == "round_robin":
        return round_robin(round_num, fed.clients, fed.sampled_per_round)
    return sample_partitions(scenario.seed, round_num, fed.clients, fed.sampled_per_round)


def slow_partitions(spec: StalenessSpec, labels_of: list[Tensor]) -> list[int]:
    """The slow clients (sorted partition ids): ``spec.slow_clients``, or the ``spec.num_slow`` partitions holding
    the most examples of ``spec.slow_class`` (ties broken by lower partition id); ``labels_of[i]`` are partition
    i's labels (only read for ``slow_class``)."""
    if spec.slow_clients is not None:
        return sorted(set(spec.slow_clients))
    counts = [int((torch.as_tensor(y) == spec.slow_class).sum()) for y in labels_of]
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return sorted(order[: spec.num_slow])


def model_round(round_num: int, tau: int, slow: bool, aggregation: str) -> int:
    """Index r of the global model ``w^r`` the client trains from in ``round_num`` (1-based; ``w^0`` initial):
    ``round_num - 1`` (current) for a fresh client, under ``no_staleness``, or while ``round_num <= tau``;
    else ``round_num - 1 - tau``."""
    if not slow or aggregation == "no_staleness" or round_num - 1 - tau < 0:
        return round_num - 1
    return round_num - 1 - tau


@dataclass(frozen=True)
class StaleArrival:
    """One slow client's result as the server has it in round ``round``: the model it was sent (``base`` =
    ``w^{round-1-tau}``), the model it returned (``local``), the current model (``current`` = ``w^{round-1}``),
    its lag ``tau`` and declared ``num_examples``. ``memory`` is the rule's per-run dict (e.g. a warm start)."""

    round: int
    partition_id: int
    tau: int
    base: dict[str, Tensor]
    local: dict[str, Tensor]
    current: dict[str, Tensor]
    num_examples: int
    memory: dict[str, Any] = field(default_factory=dict)


# A rule: the slow client's model to put in the mean, from its arrival and the scenario (the server's own
# knowledge: federation.staleness, the clients' local hyperparameters, the model it builds via setup_for).
StaleRule = Callable[[StaleArrival, Scenario], dict[str, Tensor]]


def _rebased(arrival: StaleArrival, convert: Callable[[Tensor, str], Tensor]) -> dict[str, Tensor]:
    """``current + convert(delta, key)`` on every floating-point tensor (delta = local - base); any other tensor
    (e.g. BatchNorm's integer step counter) is the client's as sent."""
    out = {}
    for k, v in arrival.local.items():
        if v.is_floating_point():
            delta = v - arrival.base[k].to(v.dtype)
            out[k] = arrival.current[k].to(v.dtype) + convert(delta, k)
        else:
            out[k] = v.clone()
    return out


def direct(arrival: StaleArrival, scenario: Scenario) -> dict[str, Tensor]:
    """``w^t + delta``: the stale update applied to the current model as it is."""
    return _rebased(arrival, lambda d, k: d)


def downweight(arrival: StaleArrival, scenario: Scenario) -> dict[str, Tensor]:
    """``w^t + 2^(-tau/20) delta`` (the authors' ``dc = 4``; x0.25 at tau = 40)."""
    scale = 2.0 ** (-arrival.tau / 20.0)
    return _rebased(arrival, lambda d, k: scale * d)


def dc_asgd(arrival: StaleArrival, scenario: Scenario) -> dict[str, Tensor]:
    """DC-ASGD's first-order delay compensation (Zheng et al., ICML 2017), the authors' ``dc = 3``:
    ``w^t + delta - lambda * delta * delta * (w^t - w^{t-tau})`` elementwise, lambda =
    ``federation.staleness.dc_lambda``."""
    lam = scenario.federation.staleness.dc_lambda
    return _rebased(arrival, lambda d, k: d - lam * d * d * (arrival.current[k].to(d.dtype)
                                                               - arrival.base[k].to(d.dtype)))


# gi_conversion: the gradient-inversion repair of spec 12.2 (fedsim.simulation.stale_gi)
STALE_RULES: dict[str, StaleRule] = {"direct": direct, "downweight": downweight, "dc_asgd": dc_asgd,
                                     "gi_conversion": gi_conversion}


def check_staleness(scenario: Scenario, num_classes: int | None = None) -> None:
    """Refuse (ScenarioError at ``federation.staleness...``) what a staleness block cannot run with: a defense that
    wraps the server strategy or asks for secure aggregation (their server sees no per-client, per-model reply to
    rebase), or a ``slow_class`` the task lacks (``num_classes``: 0 for a regression; None skips that check)."""
    stale = scenario.federation.staleness
    if stale is None:
        return
    from fedsim.defenses import DEFENSES
    from fedsim.defenses.base import Defense

    for i, spec in enumerate(scenario.defenses):
        cls = DEFENSES.get(spec.name)
        if getattr(cls, "secure_aggregation", False) or cls.wrap_strategy is not Defense.wrap_strategy:
            raise ScenarioError("federation.staleness", f"defenses[{i}] ({spec.name}) changes the server's "
                                "aggregation, which stale updates cannot pass through: drop one of the two")
    if stale.slow_class is not None and num_classes is not None and not 0 <= stale.slow_class < num_classes:
        what = f"outside 0..{num_classes - 1}" if num_classes else "meaningless on a regression task"
        raise ScenarioError("federation.staleness.slow_class", f"class {stale.slow_class} is {what}")
    check_gi(scenario, num_classes)
