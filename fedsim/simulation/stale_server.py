"""The server side of staleness: the kept global models, the messages that send slow clients an old one, and the
rebasing of their replies by the scenario's rule (:mod:`fedsim.simulation.staleness` says what each means).

Used by :class:`fedsim.simulation.strategies.FedSimFedAvg` when ``federation.staleness`` is set: in
``configure_train`` it keeps the current model and builds one message per sampled client (a slow client's carries
``w^{t-1-tau}`` and, in its config, ``fedsim.staleness`` = the lag and ``fedsim.model-round`` = which model it is);
in ``aggregate_train`` it replaces each stale reply's arrays by the rule's model before the FedAvg mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsim.scenario import Scenario
from fedsim.simulation import keys
from fedsim.simulation.setup import setup_for
from fedsim.simulation.stale_gi import EstimateRecord
from fedsim.simulation.staleness import STALE_RULES, StaleArrival, model_round, slow_partitions


@dataclass
class StaleRound:
    """What ``gi_conversion`` did in one round, for the evaluator: its ``records`` (one per inversion, failed ones
    included), ``switches`` (partition id -> the switch round s of each client that first met lambda_t < 1 this
    round) and ``uninverted`` (stale updates aggregated without an inversion because lambda_t = 0)."""

    records: list[EstimateRecord] = field(default_factory=list)
    switches: dict[int, int] = field(default_factory=dict)
    uninverted: int = 0


class StaleModels:
    """The last ``tau + 1`` global models (``w^{t-1-tau} .. w^{t-1}``) and which one each client of a round got."""

    def __init__(self, scenario: Scenario) -> None:
        spec = scenario.federation.staleness
        if spec is None:
            raise ValueError("StaleModels needs federation.staleness")
        self.spec, self.scenario = spec, scenario
        setup = setup_for(scenario)
        labels = [setup.data.train_y[p] for p in setup.partitions] if spec.slow_class is not None else []
        self.slow = frozenset(slow_partitions(spec, labels))
        self.history: dict[int, ArrayRecord] = {}  # r -> w^r
        self.sent: dict[int, int] = {}  # partition id -> r of the model it was sent this round
        self.memory: dict[int, dict[str, Any]] = {}  # partition id -> the rule's memory for that client
        # the server's estimates of client data (gi_conversion) not yet handed to the evaluator
        self.estimates: list[EstimateRecord] = []
        self.rounds: dict[int, StaleRound] = {}  # round -> gi_conversion's switches and skipped inversions
        self.switched: set[int] = set()  # partition ids whose switch was reported

    def messages(self, server_round: int, current: ArrayRecord, config: ConfigRecord, pids: list[int],
                 node_of_partition: dict[int, int]) -> list[Message]:
        """One TRAIN message per partition in ``pids``: the model :func:`model_round` picks, its lag in the config."""
        self.history[server_round - 1] = current
        for r in [r for r in self.history if r < server_round - 1 - self.spec.tau]:
            del self.history[r]
        self.sent = {}
        out = []
        for pid in pids:
            r = model_round(server_round, self.spec.tau, pid in self.slow, self.spec.aggregation)
            self.sent[pid] = r
            cfg = ConfigRecord({**dict(config), keys.STALENESS: server_round - 1 - r, keys.MODEL_ROUND: r})
            content = RecordDict({keys.ARRAYS: self.history[r], keys.CONFIG: cfg})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_of_partition[pid]))
        return out

    def rebase(self, server_round: int, contents: list[RecordDict]) -> list[RecordDict]:
        """The replies with each stale one's arrays replaced by its rule's model (new records; nothing mutated)."""
        rule = STALE_RULES.get(self.spec.aggregation)
        current = self.history[server_round - 1]
        out = []
        for content in contents:
            pid = int(content[keys.METRICS][keys.PARTITION_ID])
            r = self.sent.get(pid, server_round - 1)
            if r == server_round - 1 or rule is None:  # fresh (or no_staleness): as it came
                out.append(content)
                continue
            arrival = StaleArrival(
                round=server_round, partition_id=pid, tau=server_round - 1 - r,
                base=self.history[r].to_torch_state_dict(), local=content[keys.ARRAYS].to_torch_state_dict(),
                current=current.to_torch_state_dict(), num_examples=int(content[keys.METRICS][keys.NUM_EXAMPLES]),
                memory=self.memory.setdefault(pid, {}),
            )
            record = RecordDict(dict(content.items()))
            record[keys.ARRAYS] = ArrayRecord(rule(arrival, self.scenario))
            estimate = arrival.memory.pop("estimate_record", None)
            if estimate is not None:
                self.estimates.append(estimate)
            if self.spec.aggregation == "gi_conversion":
                events = self.rounds.setdefault(server_round, StaleRound())
                events.uninverted += estimate is None
                if "switch_round" in arrival.memory and pid not in self.switched:
                    self.switched.add(pid)
                    events.switches[pid] = int(arrival.memory["switch_round"])
            out.append(record)
        return out

    def take_estimates(self, server_round: int) -> list[EstimateRecord]:
        """The estimates the rule made in ``server_round`` (removed from the list): the evaluator scores them."""
        taken = [e for e in self.estimates if e.round == server_round]
        self.estimates = [e for e in self.estimates if e.round != server_round]
        return taken

    def take_round(self, server_round: int) -> StaleRound:
        """:meth:`take_estimates` of ``server_round`` with that round's switch events (removed)."""
        events = self.rounds.pop(server_round, StaleRound())
        events.records = self.take_estimates(server_round)
        return events
