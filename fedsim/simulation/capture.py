"""The honest-but-curious server hook: a Grid proxy that sees every reply before aggregation.

The proxy sits outermost (between the strategy, or any wrapper such as Flower's server-side DP,
and the real Grid), so it records updates exactly as they arrive. For each targeted (round,
partition) it keeps a clone of the global weights sent out and of the update received, as a
:class:`CapturedUpdate`; the client's ``fedsim.truth`` record is stripped from *every* reply
here, before the strategy sees it, and travels on only inside the captured update's
:class:`GroundTruth`, which only the evaluator reads. Replies are sorted by partition id so that
aggregation order, and therefore every number, is the same on every backend.

The proxy also keeps the round's participation (clients asked, aggregated, failed with their reasons)
and applies the failure policy of :mod:`fedsim.simulation.participation` once the replies are in.

When a defense makes the clients send gradient DIFFERENCES (DIFF2, ``Defense.message_reference``), the proxy
keeps the model it sent in the round before and records it as the captured update's ``reference_state`` (the
server sent both models, so every threat model knows it). A targeted client's message is re-sent with its
config flagged; every record of the original message travels unchanged.

Under ``federation.staleness`` a slow client is sent an older global model (:mod:`fedsim.simulation.staleness`):
the proxy records, per client, the model that client's message carried (so a slow client's ``global_state`` is the
``w^{t-1-tau}`` it trained from and its update is taken against it) and the lag its config states (``staleness``).

Under a malicious server (:mod:`fedsim.simulation.malicious`) the proxy hands the round's TRAIN messages to the
:class:`~fedsim.simulation.malicious.Manipulator` first (the receivers' messages then carry the manipulated model
and its architecture), records a receiver's update against the model it was sent (``global_state`` = the
manipulated state, ``architecture`` = the changes), and only then, after capturing, restores each manipulated
reply to an update of the agreed model, so every strategy and wrapper inside aggregates the agreed model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.errors import SimulationError
from fedsim.simulation import keys
from fedsim.simulation.participation import Participation
from fedsim.simulation.records import to_state
from fedsim.threat import GroundTruth

if TYPE_CHECKING:
    from fedsim.simulation.malicious import Manipulator

AGGREGATE_ID = -1  # partition id of a captured aggregate (secure aggregation: it belongs to no one client)
RELEASED_MODEL_ID = -2  # partition id of a model-inversion outcome: it attacks the released global model


@dataclass(frozen=True)
class CapturedUpdate:
    """One observed update and its ground truth (kept apart: attacks get views without ``truth``)."""

    round: int
    partition_id: int
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]  # fedsgd: gradient; fedavg: weight delta (local - global)
    num_examples: int
    truth: GroundTruth
    # DIFF2 difference rounds: the global model of the round before (x_{r-1}), which the client's subtracted
    # per-sample gradients were taken at; None for a plain gradient or weight delta
    reference_state: dict[str, torch.Tensor] | None = None
    # rounds between the model this client was sent (global_state: w^{t-1-tau}) and the current one (0: fresh);
    # the server chose which model to send, so it knows this (federation.staleness)
    staleness: int = 0
    # the architecture changes a malicious server shipped with global_state (ServerModel.architecture); () if none
    architecture: tuple[dict, ...] = ()
    # the index (attacks[i]) of the malicious attack whose manipulate built global_state; None: the honest model.
    # Set by the malicious server's path, so the runner files any attack on this update under its letter too
    manipulated_by: int | None = None


@dataclass
class CaptureLog:
    targets: set[tuple[int, int]]  # (round, partition id) pairs to capture
    protocol: str
    updates: list[CapturedUpdate] = field(default_factory=list)
    train_loss: dict[int, float] = field(default_factory=dict)  # round -> mean client loss
    # round -> partition id -> metrics a defense reported on the client (e.g. {"epsilon": 1.2})
    client_metrics: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)
    participation: Participation = field(default_factory=Participation)
    # round -> how many clients were sent an older model than the current one (federation.staleness)
    stale: dict[int, int] = field(default_factory=dict)
    # time.perf_counter() when the server first handed training messages (round 1's) to the backend
    first_train_sent: float | None = None

    def wants(self, round_num: int, partition_id: int) -> bool:
        return (round_num, partition_id) in self.targets

    def note_train_sent(self) -> None:
        """Stamp the first hand-over of training messages (``fedsim run``'s ``timing.startup_s`` ends there)."""
        if self.first_train_sent is None:
            self.first_train_sent = time.perf_counter()


def _unpack_truth(record, round_num: int, pid: int) -> GroundTruth:
    arrays = to_state(record)
    extras = {k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")}
    return GroundTruth(round_num, pid, arrays["inputs"], arrays["labels"], extras)


class ProxyGrid(Grid):
    """A Grid that delegates everything to ``inner``; subclasses hook ``send_and_receive``."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run type
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def record_client_reply(log: CaptureLog, round_num: int, metrics) -> float | None:  # noqa: ANN001 - a metrics mapping
    """Keep a reply's defense metrics (e.g. epsilon) in ``log.client_metrics``; return its train loss (None if NaN:
    a DP client whose Poisson batches were all empty has none)."""
    pid = int(metrics[keys.PARTITION_ID])
    prefix = keys.CLIENT_METRIC_PREFIX
    reported = {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
    if reported:
        log.client_metrics.setdefault(round_num, {})[pid] = reported
    loss = float(metrics.get(keys.TRAIN_LOSS, float("nan")))
    return loss if loss == loss else None


class CapturingGrid(ProxyGrid):
    """Delegates to ``inner``; records targeted updates and participation; strips ground truth from every reply.

    ``needs_every_client``: why any failed client stops the run (a defense needs every client), or None.
    ``references(round)``: whether that round's messages are gradient differences against the previous round's
    model (then the proxy keeps each round's model, to record it as ``reference_state``).
    """

    def __init__(self, inner: Grid, log: CaptureLog, partition_of_node: dict[int, int],
                 needs_every_client: str | None = None, references: Callable[[int], bool] | None = None,
                 manipulator: Manipulator | None = None) -> None:
        super().__init__(inner)
        self.manipulator = manipulator  # a malicious server's (fedsim.simulation.malicious), or None
        self.log = log
        self.partition_of_node = partition_of_node
        self.needs_every_client = needs_every_client
        self.references = references
        self.sent: tuple[int, dict[str, torch.Tensor]] | None = None  # (round, model sent): the last round's

    # -- the hook ----------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        outgoing, sent_state, lag, asked = [], {}, {}, []
        round_num, previous, this_round = 0, self.sent, None
        if self.manipulator is not None:  # a malicious server's round: the receivers get the manipulated model
            messages = self.manipulator.outgoing(list(messages), self.partition_of_node)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                config = msg.content[keys.CONFIG]
                round_num = int(config[keys.SERVER_ROUND])
                pid = self.partition_of_node[msg.metadata.dst_node_id]
                asked.append(pid)
                stale = int(config.get(keys.STALENESS, 0))  # a slow client is sent an older model
                if stale:
                    self.log.stale[round_num] = self.log.stale.get(round_num, 0) + 1
                manipulated = keys.ARCHITECTURE in config  # it carries a malicious server's model
                if self.references is not None and this_round is None and not stale and not manipulated:
                    this_round = dict(to_state(msg.content[keys.ARRAYS]))  # to_state copies
                if self.log.wants(round_num, pid):
                    flagged = ConfigRecord(dict(config))
                    flagged[keys.RECORD_TRUTH] = True
                    # the model THIS client was sent (w^{t-1-tau} for a slow one): its update is taken against it
                    sent_state[pid] = dict(to_state(msg.content[keys.ARRAYS]))
                    lag[pid] = stale
                    content = RecordDict(dict(msg.content.items()))  # every record, the config flagged
                    content[keys.CONFIG] = flagged
                    msg = Message(
                        content,
                        dst_node_id=msg.metadata.dst_node_id,
                        message_type=msg.metadata.message_type,
                        group_id=msg.metadata.group_id,
                    )
            outgoing.append(msg)
        if this_round is None and self.manipulator is not None and round_num in self.manipulator.sent:
            this_round = self.manipulator.sent[round_num].honest  # every client got the manipulated model
        if this_round is not None:
            self.sent = (round_num, this_round)
        if round_num:
            self.log.note_train_sent()
        replies = list(self.inner.send_and_receive(outgoing, timeout=timeout))
        if not round_num:  # no training message (e.g. an evaluation round): nothing to record
            return replies
        reference = None
        if self.references is not None and self.references(round_num) and sent_state:
            if previous is None or previous[0] != round_num - 1:
                raise SimulationError(f"round {round_num}: the model of round {round_num - 1}, which the clients' "
                                      "differences were taken against, was not kept")
            reference = previous[1]
        replies.sort(key=self._partition_of_reply)
        for pid in sorted(set(asked) - {self._partition_of_reply(r) for r in replies}):
            self.log.participation.fail(round_num, pid, "no reply (the client's node was lost or timed out)")
        losses, arrived = [], 0
        for reply in replies:
            if reply.has_error():
                self.log.participation.fail(round_num, self._partition_of_reply(reply), reply.error.reason)
                continue
            if not reply.has_content():
                continue
            truth_record = reply.content.array_records.get(keys.TRUTH)
            if truth_record is not None:
                del reply.content[keys.TRUTH]
            arrived += 1
            metrics = reply.content.get(keys.METRICS)
            if metrics is None or keys.PARTITION_ID not in metrics:
                continue
            pid = int(metrics[keys.PARTITION_ID])
            loss = record_client_reply(self.log, round_num, metrics)
            if loss is not None:
                losses.append(loss)
            if pid in sent_state and truth_record is not None:
                self._record(round_num, pid, reply, sent_state[pid], _unpack_truth(truth_record, round_num, pid),
                             reference, lag.get(pid, 0))
        if losses:
            self.log.train_loss[round_num] = sum(losses) / len(losses)
        if self.manipulator is not None:  # after capturing: the strategy aggregates updates of the agreed model
            self.manipulator.restore_replies(round_num, replies, self._partition_of_reply)
        self.log.participation.requested[round_num] = len(asked)
        self.log.participation.aggregated[round_num] = arrived
        self.log.participation.check(round_num, self.needs_every_client)
        return replies

    def _partition_of_reply(self, reply: Message) -> int:
        return self.partition_of_node.get(reply.metadata.src_node_id, -1)

    def _record(self, round_num: int, pid: int, reply: Message, global_state: dict, truth: GroundTruth,
                reference: dict[str, torch.Tensor] | None = None, staleness: int = 0) -> None:
        sent = to_state(reply.content[keys.ARRAYS])
        if self.log.protocol == "fedavg":
            update = {k: v - global_state[k] for k, v in sent.items() if v.is_floating_point()}
        else:
            update = {k: v.clone() for k, v in sent.items()}
        manipulation = None if self.manipulator is None else self.manipulator.received(round_num, pid)
        self.log.updates.append(CapturedUpdate(
            round=round_num, partition_id=pid, global_state=global_state, update=update,
            num_examples=int(reply.content[keys.METRICS][keys.NUM_EXAMPLES]), truth=truth,
            reference_state=None if reference is None else {k: v.clone() for k, v in reference.items()},
            staleness=staleness, architecture=() if manipulation is None else manipulation.architecture,
            manipulated_by=None if manipulation is None else manipulation.attack_index,
        ))
