"""In-process backend: the same ServerApp and ClientApp, driven in one process without Ray.

Flower 1.41 has no non-Ray simulation backend, so this is a small ``Grid`` that hands each message
to the ClientApp directly, with one persistent ``Context`` per node (like a SuperNode keeps), the
same random node ids and the same error-reply behaviour as the Ray engine. It gives the same numbers
as the ``ray`` backend (a test checks that) in a fraction of the start-up time.
"""

from __future__ import annotations

import copy
import secrets
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.simulation import keys

_CLIENT_EXCEPTION = 1  # error code on replies of a ClientApp that raised (Flower uses small ints)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = secrets.randbits(62) + 1  # random like Flower's: nothing may rely on node ids
            self.contexts[node_id] = Context(
                run_id=run_id, node_id=node_id,
                node_config={keys.PARTITION_ID: pid, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # the client must not share objects with the server
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # noqa: BLE001 - mirror the Ray engine: an error reply, not a crash
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
                reply = Message(Error(code=_CLIENT_EXCEPTION, reason=reason), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


@contextmanager
def _task_identity(run_id: int) -> Iterator[None]:
    """Flower's Message() reads the process-global TaskIdentity, which its runtime normally sets."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_supernodes: int) -> None:
    run_id = secrets.randbits(62) + 1
    with _task_identity(run_id):
        grid = InProcessGrid(client_app, num_supernodes, run_id)
        context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grid, context)
