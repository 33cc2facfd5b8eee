"""The honest-but-curious server hook: a Grid proxy that sees every reply before aggregation.

The proxy sits outermost (between the strategy, or any wrapper such as Flower's server-side DP,
and the real Grid), so it records updates exactly as they arrive. For each targeted (round,
partition) it keeps a clone of the global weights sent out and of the update received, as a
:class:`CapturedUpdate`; the client's ``fedsim.truth`` record is stripped from *every* reply
here, before the strategy sees it, and travels on only inside the captured update's
:class:`GroundTruth`, which only the evaluator reads. Replies are sorted by partition id so that
aggregation order, and therefore every number, is the same on every backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.errors import SimulationError
from fedsim.simulation import keys
from fedsim.threat import GroundTruth

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


@dataclass
class CaptureLog:
    targets: set[tuple[int, int]]  # (round, partition id) pairs to capture
    protocol: str
    updates: list[CapturedUpdate] = field(default_factory=list)
    train_loss: dict[int, float] = field(default_factory=dict)  # round -> mean client loss
    # round -> partition id -> metrics a defense reported on the client (e.g. {"epsilon": 1.2})
    client_metrics: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)

    def wants(self, round_num: int, partition_id: int) -> bool:
        return (round_num, partition_id) in self.targets


def _unpack_truth(record, round_num: int, pid: int) -> GroundTruth:
    arrays = record.to_torch_state_dict()
    extras = {k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")}
    return GroundTruth(round_num, pid, arrays["inputs"], arrays["labels"], extras)


class CapturingGrid(Grid):
    """Delegates to ``inner``; records targeted updates; strips ground truth from every reply."""

    def __init__(self, inner: Grid, log: CaptureLog, partition_of_node: dict[int, int]) -> None:
        self.inner = inner
        self.log = log
        self.partition_of_node = partition_of_node

    # -- plain delegation -------------------------------------------------------------------
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

    # -- the hook ----------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        outgoing, sent_state = [], {}
        round_num = 0
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                config = msg.content[keys.CONFIG]
                round_num = int(config[keys.SERVER_ROUND])
                pid = self.partition_of_node[msg.metadata.dst_node_id]
                if self.log.wants(round_num, pid):
                    flagged = ConfigRecord(dict(config))
                    flagged[keys.RECORD_TRUTH] = True
                    arrays = msg.content[keys.ARRAYS]
                    sent_state[pid] = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
                    msg = Message(
                        RecordDict({keys.ARRAYS: arrays, keys.CONFIG: flagged}),
                        dst_node_id=msg.metadata.dst_node_id,
                        message_type=msg.metadata.message_type,
                        group_id=msg.metadata.group_id,
                    )
            outgoing.append(msg)
        replies = list(self.inner.send_and_receive(outgoing, timeout=timeout))
        self._check_errors(replies, round_num)
        replies.sort(key=self._partition_of_reply)
        losses = []
        for reply in replies:
            if not reply.has_content():
                continue
            truth_record = reply.content.array_records.get(keys.TRUTH)
            if truth_record is not None:
                del reply.content[keys.TRUTH]
            metrics = reply.content.get(keys.METRICS)
            if metrics is None or keys.PARTITION_ID not in metrics:
                continue
            pid = int(metrics[keys.PARTITION_ID])
            loss = float(metrics.get(keys.TRAIN_LOSS, float("nan")))
            if loss == loss:  # not NaN: a DP client whose Poisson batches were all empty has no loss
                losses.append(loss)
            reported = {k[len(keys.CLIENT_METRIC_PREFIX):]: float(v) for k, v in metrics.items()
                        if k.startswith(keys.CLIENT_METRIC_PREFIX)}
            if reported:
                self.log.client_metrics.setdefault(round_num, {})[pid] = reported
            if pid in sent_state and truth_record is not None:
                self._record(round_num, pid, reply, sent_state[pid], _unpack_truth(truth_record, round_num, pid))
        if losses:
            self.log.train_loss[round_num] = sum(losses) / len(losses)
        return replies

    def _partition_of_reply(self, reply: Message) -> int:
        return self.partition_of_node.get(reply.metadata.src_node_id, 1 << 30)

    def _check_errors(self, replies: list[Message], round_num: int) -> None:
        for reply in replies:
            if reply.has_error():
                pid = self.partition_of_node.get(reply.metadata.src_node_id, "?")
                raise SimulationError(f"client {pid} failed in round {round_num}: {reply.error.reason}")

    def _record(self, round_num: int, pid: int, reply: Message, global_state: dict, truth: GroundTruth) -> None:
        sent = reply.content[keys.ARRAYS].to_torch_state_dict()
        if self.log.protocol == "fedavg":
            update = {k: v - global_state[k] for k, v in sent.items() if v.is_floating_point()}
        else:
            update = {k: v.clone() for k, v in sent.items()}
        self.log.updates.append(CapturedUpdate(
            round=round_num, partition_id=pid, global_state=global_state, update=update,
            num_examples=int(reply.content[keys.METRICS][keys.NUM_EXAMPLES]), truth=truth,
        ))
