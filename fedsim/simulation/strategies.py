"""Server strategies: Flower's FedAvg with reproducible, partition-aware client sampling, and FedSGD.

Flower's own ``sample_nodes`` draws with ``random.sample`` over node ids that are random per run,
so which clients train in a round would differ between runs and backends. Here the sample is a
set of *partition ids* drawn from (seed, round), mapped to whatever node holds each partition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.scenario import Scenario
from fedsim.simulation import keys
from fedsim.simulation.records import to_record, to_state, weighted_mean
from fedsim.simulation.setup import setup_for
from fedsim.simulation.stale_server import StaleModels
from fedsim.simulation.staleness import round_partitions, sample_partitions

__all__ = ["FedSGD", "FedSimFedAvg", "build_strategy", "sample_partitions", "server_step"]

log = logging.getLogger("fedsim")
WEIGHT_KEY = "fedsim.aggregation-weight"  # the weight each reply gets, as aggregate_arrayrecords reads it

def aggregation_weights(declared: list[float], uniform: bool) -> tuple[list[float], bool]:
    """Each reply's weight in the mean and whether it fell back to uniform: ``declared`` (num-examples)
    unless ``uniform`` is asked for or they sum to no positive total (then a weighted mean would divide
    by zero: e.g. clients that each declared 0 examples); then every reply weighs 1."""
    if uniform or not sum(declared) > 0:
        return [1.0] * len(declared), not uniform
    return list(declared), False


def server_step(scenario: Scenario, server_round: int, current: dict[str, torch.Tensor],
                mean_message: dict[str, torch.Tensor], memory: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The FedSGD server step of BOTH server paths (plain :class:`FedSGD` and SecAgg+ in
    :mod:`fedsim.simulation.secure`): the global model after ``server_round``.

    ``current``: the model the clients received (full state); ``mean_message``: the mean of their messages
    (trainable parameter name -> tensor). A defense's ``server_update`` decides it (e.g. DIFF2's estimator;
    ``memory[defense name]`` is that defense's dict for the run); otherwise ``current - lr * mean`` with
    lr = ``federation.server_lr`` or ``local.lr`` (buffers and anything not in the message stay as they are).
    """
    from fedsim.defenses.base import Defense

    for defense in setup_for(scenario).defenses:
        if type(defense).server_update is not Defense.server_update:
            stepped = defense.server_update(server_round, current, mean_message, memory.setdefault(defense.name, {}))
            if stepped is not None:
                return stepped
    fed = scenario.federation
    lr = fed.server_lr or fed.local.lr
    return {k: (v - lr * mean_message[k].to(v.dtype)) if k in mean_message else v for k, v in current.items()}


def uniform_mean(scenario: Scenario) -> bool:
    """Whether a defense asks the plain path for the unweighted mean of the replies (``Defense.uniform_mean``)."""
    return any(getattr(d, "uniform_mean", False) for d in setup_for(scenario).defenses)


class FedSimFedAvg(FedAvg):
    """FedAvg (McMahan et al., 2017) whose client sample depends only on (seed, round).

    The mean is weighted by the clients' ``num-examples`` unless :attr:`uniform_weights` is set (central
    DP sets it: its noise is calibrated to the unweighted mean, McMahan et al., ICLR 2018); a round whose
    weights sum to zero is averaged uniformly instead of dividing by zero. Under an ``audit:`` at the client
    level the canary clients' replies arrive among the real ones (:mod:`fedsim.audit.client_canaries`, the
    outermost wrapper) and are averaged like them.
    """

    def __init__(self, scenario: Scenario, node_of_partition: dict[int, int]) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                         min_evaluate_nodes=0, min_available_nodes=1)
        self.scenario = scenario
        self.node_of_partition = node_of_partition
        self.current_arrays: ArrayRecord | None = None
        self.uniform_weights = uniform_mean(scenario)  # central DP's wrapper sets it too
        self.server_memory: dict[str, dict[str, Any]] = {}  # per defense: its server_update state for this run
        self.stale = StaleModels(scenario) if scenario.federation.staleness is not None else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The (weighted or uniform) mean of the replies' arrays, and their metrics averaged alike."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        if self.stale is not None:  # a slow client's model, rebased on the current one by the staleness rule
            contents = self.stale.rebase(server_round, contents)
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        weights, fallback = aggregation_weights([float(m[self.weighted_by_key]) for m in metrics],
                                                self.uniform_weights)
        if fallback:
            log.warning("round %d: the clients' num-examples sum to 0; their updates were averaged uniformly",
                        server_round)
        reweighted = []
        for content, m, w in zip(contents, metrics, weights, strict=True):
            record = RecordDict(dict(content.array_records))
            record["metrics"] = MetricRecord({**dict(m), WEIGHT_KEY: w})
            reweighted.append(record)
        mean = weighted_mean(reweighted, WEIGHT_KEY)  # Flower's aggregate_arrayrecords, headers parsed once
        return mean, self.train_metrics_aggr_fn(reweighted, WEIGHT_KEY)

    def summary(self) -> None:  # Flower logs this at INFO; fedsim's report says it instead
        return None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        pids = round_partitions(self.scenario, server_round)
        config[keys.SERVER_ROUND] = server_round
        self.current_arrays = arrays
        if self.stale is not None:  # slow clients are sent an old model, with its lag in their config
            return self.stale.messages(server_round, arrays, config, pids, self.node_of_partition)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.node_of_partition[p] for p in pids], MessageType.TRAIN)


class FedSGD(FedSimFedAvg):
    """FedSGD: clients send the gradient of one batch; the server averages and takes one step.

    ``w <- w - server_lr * sum_k (n_k / n) g_k`` (McMahan et al., 2017, the FedSGD baseline), or a defense's own
    server rule (:func:`server_step`, shared with the SecAgg+ path). Buffers (e.g. BatchNorm running
    statistics) are not sent under FedSGD and stay at their initial values.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None or self.current_arrays is None:
            return None, metrics
        stepped = server_step(self.scenario, server_round, to_state(self.current_arrays), to_state(mean_grad),
                              self.server_memory)
        return to_record(stepped), metrics


def build_strategy(scenario: Scenario, node_of_partition: dict[int, int]) -> FedAvg:
    cls = FedSGD if scenario.federation.protocol == "fedsgd" else FedSimFedAvg
    return cls(scenario, node_of_partition)

