"""The zeroth-order ServerApp: FZooS's two exchanges per round and the safeguard message (spec §11.6, §11.9).

A custom ``@app.main()`` loop on ``grid.send_and_receive`` (no Flower strategy: the protocol is not FedAvg):

* round 0, only what the protocol needs: with the safeguard, ``query.safeguard`` at ``x0`` to every client:
  ``f_i(x0)`` (the server's F(x_0)) and, for FZooS, the clients' initial queries around ``x0``; with ``safeguard:
  off``, FZooS sends ``query.init`` (the initial queries, no value comes back) and the baselines send nothing;
* round r = 1..R:
  1. ``train``: ``x_r`` and the method payload (FZooS from round 2: the global surrogate) -> ``x_{i,r}`` and the
     reply payload; the server computes the candidate ``x_{r+1} = x_r - eta sum_i w_i (x_r - x_{i,r})``;
  2. ``query.safeguard`` (unless ``safeguard: off``): ``f_i(candidate)`` from every client; the server keeps
     ``x_r`` when ``sum_i w_i f_i(candidate) >= F(x_r)`` (the authors' oracle, made a real message: spec §11.8);
  3. ``train.refresh`` (FZooS only): ``x_{r+1}``, the client's radius ``r_i`` and weight ``w_i`` ->
     ``nu_i, y_min, y_max``; the server aggregates them into the global surrogate of round r+1;
     ``train.control`` (SCAFFOLD type I only): ``x_{r+1}`` -> a fresh estimate ``c_i`` (d,).

The server's arithmetic (candidate point, safeguard rule, radii, payloads) is :mod:`fedsim.zo.aggregate`.

Every client takes part in every round: a client error reply, or a reply carrying a non-finite number (a point,
value, surrogate weight or control variate: it would poison every later round silently), stops the run with a
one-line reason naming the client, the round and the message (:class:`~fedsim.errors.SimulationError`). Replies
are ordered by partition id, so every sum runs in one order on every backend. What the server received each round
is captured as a :class:`~fedsim.zo.api.ZORoundView` (:mod:`fedsim.zo.capture`); the server never holds the
objective, only the public ``x0`` and weights ``w_i``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedsim.errors import SimulationError
from fedsim.simulation import keys
from fedsim.simulation.participation import one_line
from fedsim.simulation.server_app import PULL_INTERVAL_S, discover_partitions
from fedsim.zo import client_app as msg_keys
from fedsim.zo.api import GlobalSurrogate, RFFMessage, ZORoundView
from fedsim.zo.capture import RoundTraffic, build_view
from fedsim.zo.spec import ZerothOrderSpec

ZORoundCallback = Callable[[ZORoundView, RoundTraffic], None]


@dataclass
class ZOOutcome:
    """What the zeroth-order federation produced: one view and one traffic record per round (round 0: the
    initial values), the final point and the wall time (the ServerApp thread fills it on every backend)."""

    views: list[ZORoundView] = field(default_factory=list)
    traffic: list[RoundTraffic] = field(default_factory=list)
    final_x: Tensor | None = None
    seconds: float = 0.0


def _reason(text: str) -> str:
    """A client's error reason in one line; a MemoryError (whose text is empty) names the settings that size the
    arrays, since validate's per-array bound (2 GiB, :mod:`fedsim.zo.validate`) cannot see the machine's memory."""
    line = one_line(text)
    if "MemoryError" in line:
        line = ("out of memory (MemoryError): the largest arrays are sized by zeroth_order.fzoos.rff_features x the "
                "task's d (zeroth_order.task.dim), fzoos.rff_points / gp_points and attacks.heldout_points; lower them")
    return line


class _Exchange:
    """One message type to every client, replies checked and ordered by partition id."""

    def __init__(self, grid: Grid, partition_of_node: dict[int, int]) -> None:
        self.grid, self.partition_of_node = grid, partition_of_node
        self.node_of = {p: n for n, p in partition_of_node.items()}

    def __call__(self, message_type: str, round_num: int, contents: dict[int, RecordDict]) -> dict[int, Message]:
        msgs = [Message(contents[p], dst_node_id=self.node_of[p], message_type=message_type) for p in sorted(contents)]
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(msgs):
            pid = self.partition_of_node.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                reason = _reason(reply.error.reason)
                err = SimulationError(f"client {pid} failed in round {round_num} ({message_type}): {reason}; a "
                                      "zeroth-order federation needs every client every round, so the run stops")
                err.failure = {"round": round_num, "client": pid, "reason": reason}  # type: ignore[attr-defined]
                raise err
            replies[pid] = reply
        missing = sorted(set(contents) - set(replies))
        if missing:
            raise SimulationError(f"client {missing[0]} sent no reply in round {round_num} ({message_type}); a "
                                  "zeroth-order federation needs every client every round, so the run stops")
        return dict(sorted(replies.items()))


def _content(x: Tensor, round_num: int, arrays: dict[str, dict[str, Tensor]] | None = None,
             **config: float) -> RecordDict:
    content = RecordDict({msg_keys.POINT: ArrayRecord({"x": x}), keys.CONFIG: msg_keys.config(round_num, **config)})
    for name, values in (arrays or {}).items():
        content[name] = ArrayRecord(values)
    return content


def _metric(reply: Message, key: str) -> float:
    return float(reply.content[keys.METRICS][key])


def check_finite(what: str, round_num: int, items: dict[int, Tensor | float | dict[str, Tensor]],
                 who: str = "client") -> None:
    """Stop the run when a received (or aggregated) number is NaN or infinite: ``items`` maps a partition id to a
    tensor, a float or a dict of tensors. Raises :class:`~fedsim.errors.SimulationError` naming the client (or
    ``who``), the round and the message ``what``."""
    for pid, item in items.items():
        parts = item.values() if isinstance(item, dict) else [item]
        if not all(bool(torch.isfinite(torch.as_tensor(p, dtype=torch.float64)).all()) for p in parts):
            name = f"client {pid}" if who == "client" else who
            err = SimulationError(f"{name} sent a non-finite {what} in round {round_num} (NaN or inf: it would "
                                  "poison every later round), so the run stops; check the zeroth_order settings")
            err.failure = {"round": round_num, "client": pid if who == "client" else -1,  # type: ignore[attr-defined]
                           "reason": f"{name} sent a non-finite {what} (NaN or inf)"}
            raise err


def build_zo_server_app(spec: ZerothOrderSpec, num_clients: int, num_rounds: int, x0: Tensor, weights: list[float],
                        outcome: ZOOutcome, on_round: ZORoundCallback | None = None) -> ServerApp:
    """The ServerApp of a zeroth-order federation. ``x0`` (d,) and ``weights`` (N,) are public protocol
    parameters (the start point and the w_i of F); ``outcome`` is filled in place; ``on_round(view, traffic)``
    runs after each round (round 0 included) in the server's thread."""
    from fedsim.zo import aggregate

    app = ServerApp()
    fzoos = spec.method == "fzoos"

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = time.perf_counter()
        if hasattr(grid, "pull_interval"):  # Flower's InMemoryGrid polls replies every 0.1 s by default
            grid.pull_interval = PULL_INTERVAL_S
        send = _Exchange(grid, discover_partitions(grid, num_clients))
        pids = list(range(num_clients))
        x_r = x0.detach().to(torch.float64).clone()

        def finish(view: ZORoundView, traffic: RoundTraffic) -> None:
            outcome.views.append(view)
            outcome.traffic.append(traffic)
            if on_round is not None:
                on_round(view, traffic)

        # round 0: f_i(x0) (the safeguard's reference) and FZooS's initial queries, only what the protocol needs
        traffic, values, f_r = RoundTraffic(0), {}, float("nan")
        if spec.safeguard == "message":
            replies = send(msg_keys.SAFEGUARD, 0, {p: _content(x_r, 0) for p in pids})
            values = {p: _metric(m, msg_keys.VALUE) for p, m in replies.items()}
            check_finite("value f_i(x0)", 0, values)
            f_r = aggregate.global_value([values[p] for p in pids], weights)
            traffic.add(replies, floats_per_reply=1)
        elif fzoos:  # the initial queries around x0, no value back
            traffic.add(send(msg_keys.INIT, 0, {p: _content(x_r, 0) for p in pids}), floats_per_reply=0)
        finish(build_view(0, x_r, x_r, values=values), traffic)
        surrogate: GlobalSurrogate | None = None
        reply_payloads: dict[int, dict[str, Tensor]] = {}
        controls: dict[int, Tensor] = {}  # SCAFFOLD's c_i of the last round
        for rnd in range(1, num_rounds + 1):
            traffic = RoundTraffic(rnd)
            payload = aggregate.server_payload(spec.method, surrogate=surrogate, weights=weights,
                                               controls=[controls[p] for p in pids] if controls else None)
            replies = send(msg_keys.TRAIN, rnd, {p: _content(x_r, rnd, {msg_keys.PAYLOAD: payload} if payload else None)
                                                for p in pids})
            local = {p: m.content.array_records[msg_keys.LOCAL].to_torch_state_dict()["x"] for p, m in replies.items()}
            reply_payloads = {p: (m.content.array_records[msg_keys.PAYLOAD].to_torch_state_dict()
                                  if msg_keys.PAYLOAD in m.content.array_records else {}) for p, m in replies.items()}
            check_finite("local point x_i", rnd, local)
            check_finite("train reply payload", rnd, reply_payloads)
            traffic.add(replies, floats_per_reply=None, arrays=(msg_keys.LOCAL, msg_keys.PAYLOAD))
            if spec.method == "scaffold2":  # c_i: the mean of the client's estimates this round, sent with x_i
                controls = {p: reply_payloads[p]["c_i"] for p in pids}
            candidate = aggregate.next_point(x_r, [local[p] for p in pids], weights, spec.global_lr)
            x_next, kept, values = candidate, False, {}
            if spec.safeguard == "message":
                replies = send(msg_keys.SAFEGUARD, rnd, {p: _content(candidate, rnd) for p in pids})
                values = {p: _metric(m, msg_keys.VALUE) for p, m in replies.items()}
                check_finite("safeguard value f_i(x_cand)", rnd, values)
                traffic.add(replies, floats_per_reply=1)
                f_candidate = aggregate.global_value([values[p] for p in pids], weights)
                kept = not aggregate.accept(f_r, f_candidate)
                x_next, f_r = (x_r, f_r) if kept else (candidate, f_candidate)
                traffic.safeguard_kept = kept
            radius: dict[int, float] = {}
            surrogates: dict[int, RFFMessage] = {}
            if fzoos:
                radii = aggregate.radii(x_next, [local[p] for p in pids])
                radius = {p: float(radii[p]) for p in pids}
                refresh = {p: _content(x_next, rnd, **{msg_keys.RADIUS: radius[p], msg_keys.WEIGHT: weights[p]})
                           for p in pids}
                replies = send(msg_keys.REFRESH, rnd, refresh)
                surrogates = {p: RFFMessage(nu=m.content.array_records[msg_keys.NU].to_torch_state_dict()["nu"],
                                            y_min=_metric(m, msg_keys.Y_MIN), y_max=_metric(m, msg_keys.Y_MAX))
                              for p, m in replies.items()}
                check_finite("surrogate message (nu_i, y_min, y_max)", rnd,
                             {p: {"nu": s.nu, "y": torch.tensor([s.y_min, s.y_max])} for p, s in surrogates.items()})
                traffic.add(replies, floats_per_reply=2, arrays=(msg_keys.NU,))
                surrogate = _aggregate_surrogate(spec, surrogates, weights)
                check_finite("sum", rnd, {-1: {"nu": surrogate.nu, "offset": torch.tensor(surrogate.offset)}},
                             who="the global surrogate (the sum of the clients' messages)")
            elif spec.method == "scaffold1":  # a fresh estimate c_i at x_{r+1} (its queries count as refresh)
                replies = send(msg_keys.CONTROL, rnd, {p: _content(x_next, rnd) for p in pids})
                controls = {p: m.content.array_records[msg_keys.CONTROL_RECORD].to_torch_state_dict()["c"]
                            for p, m in replies.items()}
                check_finite("control variate c_i", rnd, controls)
                traffic.add(replies, floats_per_reply=0, arrays=(msg_keys.CONTROL_RECORD,))
            finish(build_view(rnd, x_r, x_next, local=local, payload=reply_payloads, values=values, radius=radius,
                              surrogates=surrogates, aggregate=surrogate, secagg=spec.defenses.secagg), traffic)
            x_r = x_next
        outcome.final_x = x_r
        outcome.seconds = time.perf_counter() - start

    return app


def _aggregate_surrogate(spec: ZerothOrderSpec, surrogates: dict[int, RFFMessage],
                         weights: list[float]) -> GlobalSurrogate:
    """The global surrogate of the next round (spec §11.3). Under SecAgg each message is already the client's masked
    weighted share (:func:`fedsim.zo.client_app.masked_contribution`), so the server only sums them and the pairwise
    masks cancel; otherwise ``nu = sum_i w_i (y_max,i - y_min,i) nu_i``, ``offset = sum_i w_i y_min,i``."""
    if spec.defenses.secagg:
        order = sorted(surrogates)
        nu = torch.stack([surrogates[p].nu for p in order]).sum(0)
        return GlobalSurrogate(nu=nu, offset=sum(surrogates[p].y_min for p in order))
    from fedsim.zo import rff

    return rff.aggregate([surrogates[p] for p in sorted(surrogates)], weights)
