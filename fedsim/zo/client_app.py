"""The zeroth-order ClientApp (Message API): a client that can only query values of its private black box ``f_i``.

Message types it answers (routing verified in flwr 1.42: ``"<category>.<action>"``, action ``default`` when absent):

* ``query`` - which partition this node holds (:func:`fedsim.simulation.client_app.partition_reply`);
* ``query.safeguard`` - ``f_i`` at the point sent (the server's safeguard, spec §11.8: an explicit message, not an
  oracle). In round 0 (``server-round`` 0, the point ``x0``) a FZooS client also makes its initial queries;
* ``query.init`` - round 0 under ``safeguard: off`` (FZooS): the initial queries around ``x0`` only, no value sent;
* ``train`` - phase 1 of round r: local steps from ``x_r`` with the method payload; replies ``x_{i,r}`` and the
  method's reply payload (spec §11.6 steps 1-2);
* ``train.refresh`` - phase 2 (FZooS only): queries around ``x_{r+1}`` within the radius sent and the RFF fit;
  replies ``nu_i``, ``y_min``, ``y_max`` (spec §11.6 step 4). Under ``zeroth_order.defenses.secagg`` the reply is
  the client's weighted contribution plus pairwise masks (:func:`secagg_masks`).
* ``train.control`` - SCAFFOLD type I's second exchange: a fresh control variate ``c_i`` at ``x_{r+1}``.

Every reply carries ``partition-id`` and ``queries`` (points of ``f_i`` evaluated while answering, counted here
by wrapping ``f_i``, independently of the client's own bookkeeping). The client's query history lives in its
Flower ``Context.state`` (:func:`~fedsim.simulation.client_round.load_state` / ``save_state``). An exception becomes
an error reply with a one-line reason (:func:`~fedsim.simulation.participation.client_errors_mod`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from fedsim.seeding import torch_generator
from fedsim.simulation import keys
from fedsim.simulation.client_app import partition_reply
from fedsim.simulation.client_round import load_state, save_state
from fedsim.simulation.participation import client_errors_mod
from fedsim.zo.api import ClientFunction, FederatedObjective, RFFMessage
from fedsim.zo.capture import QUERIES
from fedsim.zo.spec import ZerothOrderSpec

# message types (category.action) and record keys of the zeroth-order protocol
TRAIN, SAFEGUARD, REFRESH, CONTROL = "train", "query.safeguard", "train.refresh", "train.control"
INIT = "query.init"  # round 0 under safeguard: off (FZooS only): the initial queries around x0, no value back
POINT = "zo.point"  # ArrayRecord {"x": (d,)}: the point a message is about (x_r, the candidate, x_{r+1})
PAYLOAD = "zo.payload"  # ArrayRecord: the method's extras (server -> client in train; client -> server in reply)
LOCAL = "zo.local"  # ArrayRecord {"x": (d,)}: x_{i,r}, the phase-1 reply
NU = "zo.nu"  # ArrayRecord {"nu": (M,)}: the refresh reply's RFF weights
CONTROL_RECORD = "zo.control"  # ArrayRecord {"c": (d,)}: SCAFFOLD type I's control variate reply
ROUND, VALUE = "server-round", "zo.value"
RADIUS, WEIGHT, Y_MIN, Y_MAX = "zo.radius", "zo.weight", "zo.y-min", "zo.y-max"
def secagg_note(safeguard: str = "message") -> str:
    """The SecAgg simulation caveat; what else is sent in the clear depends on ``zeroth_order.safeguard``."""
    clear = ("x_i and the safeguard values f_i(x_{r+1}) are sent in the clear" if safeguard == "message" else
             "x_i is sent in the clear (safeguard off: no values are sent)")
    return ("zeroth_order.defenses.secagg simulates SecAgg's pairwise masking of the surrogate weights only (pair "
            "seeds from the scenario seed, float arithmetic, no key agreement and no dropout recovery); " + clear)


SECAGG_NOTE = secagg_note("message")
SECAGG_MASK_STD = 100.0  # scale of the pairwise masks, large against the weights sent (|nu| is O(1)-O(10))

ObjectiveBuilder = Callable[[ZerothOrderSpec, int, int], FederatedObjective]


def objective_for(spec: ZerothOrderSpec, num_clients: int, seed: int) -> FederatedObjective:
    """The task instance (:func:`fedsim.zo.tasks.build_objective`: cached per process; a Ray actor builds its own,
    deterministically from the seed)."""
    from fedsim.zo.tasks import build_objective

    return build_objective(spec, num_clients, seed)


class CountingFunction:
    """``f_i`` with a counter of the points it was asked for (a query is one point)."""

    def __init__(self, f: ClientFunction) -> None:
        self.f, self.count = f, 0

    def __call__(self, xs: Tensor) -> Tensor:
        self.count += int(xs.reshape(-1, xs.shape[-1]).shape[0])
        return self.f(xs)


def secagg_masks(seed: int, round_num: int, partition_id: int, num_clients: int, size: int) -> Tensor:
    """Client ``partition_id``'s pairwise mask (``size``,) float64: ``sum_{j != i} sign(j - i) * m_{ij}`` with
    ``m_{ij} = m_{ji} ~ N(0, SECAGG_MASK_STD^2)`` drawn from a seed of the pair (scenario seed, round, i, j), so
    the masks of all clients sum to zero (up to float rounding).

    This simulates SecAgg's pairwise masking (Bonawitz et al., CCS 2017) only: the pair seeds come from the
    scenario seed instead of a Diffie-Hellman key agreement, the arithmetic is floating point instead of a finite
    field, and there is no dropout recovery (zeroth-order federations need every client every round).
    """
    mask = torch.zeros(size, dtype=torch.float64)
    for other in range(num_clients):
        if other == partition_id:
            continue
        lo, hi = sorted((partition_id, other))
        pair = torch.randn(size, dtype=torch.float64, generator=torch_generator(seed, "zo-secagg", round_num, lo, hi))
        mask += (1.0 if other > partition_id else -1.0) * SECAGG_MASK_STD * pair
    return mask


def masked_contribution(msg: RFFMessage, weight: float, mask: Tensor) -> RFFMessage:
    """What a client sends under SecAgg: its weighted share of the global surrogate (spec §11.3:
    ``w_i (y_max - y_min) nu_i`` and ``w_i y_min``) plus its masks (the last entry of ``mask`` masks the offset).
    ``y_max`` equals ``y_min`` (no range: the message is pre-scaled); the server sums the messages."""
    nu = weight * (msg.y_max - msg.y_min) * msg.nu + mask[:-1]
    offset = weight * msg.y_min + float(mask[-1])
    return RFFMessage(nu=nu, y_min=offset, y_max=offset)


def point_of(msg: Message) -> Tensor:
    return msg.content.array_records[POINT].to_torch_state_dict()["x"]


def _reply(msg: Message, pid: int, queries: int, arrays: dict[str, dict[str, Tensor]],
           metrics: dict[str, float] | None = None) -> Message:
    content = RecordDict({name: ArrayRecord({k: v.detach().cpu() for k, v in a.items()})
                          for name, a in arrays.items()})
    content[keys.METRICS] = MetricRecord({keys.PARTITION_ID: pid, QUERIES: queries, **(metrics or {})})
    return Message(content, reply_to=msg)


def build_zo_client_app(spec: ZerothOrderSpec, num_clients: int, seed: int,
                        objective_fn: ObjectiveBuilder | None = None, client_cls: Any = None) -> ClientApp:
    """The ClientApp of a zeroth-order federation (``spec`` is small and pickles to Ray).

    ``objective_fn(spec, num_clients, seed)`` gives the task instance (default :func:`objective_for`);
    ``client_cls`` the client procedures (default :class:`fedsim.zo.client.ZOClient`), constructed per message as
    ``client_cls(f_i, spec, seed=, partition_id=, dim=, state=)`` from the state kept in the node's Context.
    """
    app = ClientApp(mods=[client_errors_mod])
    get_objective = objective_fn or objective_for

    def open_client(context: Context) -> tuple[int, Any, CountingFunction, dict[str, Any]]:
        pid = int(context.node_config[keys.PARTITION_ID])
        cls = client_cls
        if cls is None:
            from fedsim.zo.client import ZOClient as cls
        objective = get_objective(spec, num_clients, seed)
        f = CountingFunction(objective.clients[pid])
        state = load_state(context)
        return pid, cls(f, spec, seed=seed, partition_id=pid, dim=objective.dim, state=state), f, state

    def close_client(context: Context, client: Any) -> None:
        save_state(context, dict(client.state()))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return partition_reply(msg, context)

    @app.query("safeguard")
    def safeguard(msg: Message, context: Context) -> Message:
        pid, client, f, _ = open_client(context)
        x = point_of(msg)
        if int(msg.content[keys.CONFIG][ROUND]) == 0 and hasattr(client, "initialize"):
            client.initialize(x)  # FZooS: n_inits uniform queries around x0 (spec §11.5)
        value = float(client.values(x.reshape(1, -1))[0])
        close_client(context, client)
        return _reply(msg, pid, f.count, {}, {VALUE: value})

    @app.query("init")
    def init(msg: Message, context: Context) -> Message:
        pid, client, f, _ = open_client(context)
        client.initialize(point_of(msg))  # FZooS: n_inits uniform queries around x0 (spec §11.5)
        close_client(context, client)
        return _reply(msg, pid, f.count, {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid, client, f, _ = open_client(context)
        payload = msg.content.array_records[PAYLOAD].to_torch_state_dict() if PAYLOAD in msg.content else {}
        x_i, reply_payload = client.train(int(msg.content[keys.CONFIG][ROUND]), point_of(msg), payload)
        close_client(context, client)
        return _reply(msg, pid, f.count, {LOCAL: {"x": x_i}, PAYLOAD: dict(reply_payload or {})})

    @app.train("refresh")
    def refresh(msg: Message, context: Context) -> Message:
        pid, client, f, _ = open_client(context)
        config = msg.content[keys.CONFIG]
        round_num = int(config[ROUND])
        sent = client.refresh(round_num, point_of(msg), float(config[RADIUS]))
        close_client(context, client)
        if spec.defenses.secagg:
            mask = secagg_masks(seed, round_num, pid, num_clients, sent.nu.numel() + 1)
            sent = masked_contribution(sent, float(config[WEIGHT]), mask)
        return _reply(msg, pid, f.count, {NU: {"nu": sent.nu.to(torch.float64)}},
                      {Y_MIN: float(sent.y_min), Y_MAX: float(sent.y_max)})

    @app.train("control")
    def control(msg: Message, context: Context) -> Message:
        pid, client, f, _ = open_client(context)
        c_i = client.control_variate(int(msg.content[keys.CONFIG][ROUND]), point_of(msg))
        close_client(context, client)
        return _reply(msg, pid, f.count, {CONTROL_RECORD: {"c": c_i}})

    return app


def config(round_num: int, **values: float) -> ConfigRecord:
    """The config record of a zeroth-order message: the round and any scalar settings (radius, weight)."""
    return ConfigRecord({ROUND: round_num, **values})
