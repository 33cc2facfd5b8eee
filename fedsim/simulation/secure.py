"""Secure aggregation with Flower's SecAgg+ workflow: the curious server sees only the aggregate.

SecAgg+ exists in Flower 1.41/1.42 only on the legacy path, so the clients are the legacy app of
:mod:`fedsim.simulation.secure_client` (running the same client round as the plain path) and the
server runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy. The
capture point is that strategy's ``aggregate_fit``: under SecAgg+ it receives only the unmasked
aggregate (the weighted mean of the surviving clients' updates, quantized), which is exactly what the
server learns, plus each client's plaintext FitRes metrics (see ``secure_client``). The attack then
targets that aggregate as one update of the union of the surviving clients' batches.

Ground truth cannot ride along (the masked vectors are all a client sends), so the evaluator
re-derives each aggregated client's batch from the same (seed, round, partition id) draws and the same
defense-wrapped training job the client used (:func:`~fedsim.simulation.client_round.build_job`).
Every client is asked to train every round (partial participation is refused at validation).

A malicious server's round (:mod:`fedsim.simulation.malicious`) sends the manipulated model to EVERY client
(``configure_fit``): SecAgg+ sums one flat vector layout, so every masked vector must have the manipulated model's
layout (a client orders its vector by the received model's keys, :func:`~fedsim.simulation.malicious.sent_layout`).
The unmasked aggregate is captured as it came (the manipulated layout, ``architecture`` set) and then restored to
one of the agreed model before the server step.

Under an ``audit:`` at the client level the round's included canary clients are added to the unmasked aggregate
(:func:`fedsim.audit.client_canaries.client_canary_shift`), after the capture: an attack sees what the server
received. Each adds ``(C / K) c_j``, as one more client of weight 1 / K, not a reply through the aggregation as on
the plain path: there is no client-level DP under SecAgg+, so no clipping or DP weighting for it to go through.

Failures follow :mod:`fedsim.simulation.participation`: a proxy Grid records every error reply of
the protocol's four stages as a failure of that round's client; SecAgg+ aggregates the survivors
(recovering the dropped clients' masks from their neighbours' shares), and a round it halts (too few
survivors for ``reconstruction_threshold``) stops the run with NoProgressError once the workflow
returns. Flower builds the neighbour ring with ``random.shuffle``: here the ring is built from the
clients in partition order under a per-round seed, so which failures a round survives is
reproducible.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context, MessageType
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedsim.errors import FedsimError, IncompatibleDefenseError
from fedsim.models.manipulation import apply_architecture, encode
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from fedsim.simulation import keys
from fedsim.simulation.capture import AGGREGATE_ID, CapturedUpdate, CaptureLog, ProxyGrid, record_client_reply
from fedsim.simulation.client_round import build_job
from fedsim.simulation.malicious import Manipulator
from fedsim.simulation.server_app import (
    FederationOutcome,
    RoundCallback,
    RoundRows,
    discover_partitions,
    needs_every_client,
)
from fedsim.simulation.setup import FederationSetup, setup_for
from fedsim.simulation.strategies import server_step
from fedsim.threat import GroundTruth
from fedsim.training import round_batches

_ROUND_CONFIG, _CURRENT_ROUND = "config", "current_round"  # flwr.server.workflow.constant


class _FailureGrid(ProxyGrid):
    """Records every error reply (or missing reply) of a SecAgg+ stage as a failure of that client."""

    def __init__(self, inner: Grid, log: CaptureLog, partition_of_node: dict[int, int]) -> None:
        super().__init__(inner)
        self.log, self.partition_of_node = log, partition_of_node

    def send_and_receive(self, messages, *, timeout: float | None = None):  # noqa: ANN001, ANN201 - Grid's
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if train:
            self.log.note_train_sent()  # round 1's first SecAgg+ stage: timing.startup_s ends here
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if not train or not str(train[0].metadata.group_id).isdigit():
            return replies
        rnd = int(train[0].metadata.group_id)  # SecAgg+ tags each stage's messages with the round
        pid_of = self.partition_of_node.get
        answered = {m.metadata.src_node_id for m in replies}
        for msg in train:
            if msg.metadata.dst_node_id not in answered:
                self.log.participation.fail(rnd, pid_of(msg.metadata.dst_node_id, -1),
                                            "no reply (the client's node was lost or timed out)")
        for reply in replies:
            if reply.has_error():
                self.log.participation.fail(rnd, pid_of(reply.metadata.src_node_id, -1), reply.error.reason)
        return replies


class _CapturingLegacyFedAvg(LegacyFedAvg):
    """Legacy FedAvg (fedsgd: the server step of :func:`~fedsim.simulation.strategies.server_step`, the plain
    path's rule, on the aggregate) that records the aggregate it receives."""

    def __init__(self, scenario: Scenario, outcome: FederationOutcome, names: list[str],
                 partition_of_node: dict[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario, self.outcome, self.names = scenario, outcome, names
        self.partition_of_node = partition_of_node
        self.current: list[np.ndarray] = []
        self.previous: tuple[int, list[np.ndarray]] | None = None  # (round, the model sent then)
        self.server_memory: dict[str, dict[str, Any]] = {}  # per defense: its server_update state for this run
        self.manipulator: Manipulator | None = None  # a malicious server's (fedsim.simulation.malicious)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        if self.current:
            self.previous = (server_round - 1, self.current)
        self.current = parameters_to_ndarrays(parameters)
        chosen = super().configure_fit(server_round, parameters, client_manager)
        chosen = sorted(chosen, key=lambda pair: self.partition_of_node.get(pair[0].node_id, 1 << 30))
        self.outcome.capture.participation.requested[server_round] = len(chosen)
        if self.manipulator is not None:  # SecAgg+ sums one vector layout: EVERY client gets the manipulated model
            pids = [self.partition_of_node[proxy.node_id] for proxy, _ in chosen]
            sent = self.manipulator.build(server_round, self._state(self.current), pids, to_all=True)
            if sent is not None:
                params = ndarrays_to_parameters([sent.state[k].numpy() for k in sent.layout])
                chosen = [(proxy, FitIns(params, {**ins.config, keys.ARCHITECTURE: encode(sent.architecture)}))
                          for proxy, ins in chosen]
        return chosen

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> Any:
        """``results``: the clients whose masked vectors are in the aggregate (``failures`` are recorded by
        the grid proxy, with their clients' ids, which Flower's list lacks)."""
        log = self.outcome.capture
        pids = sorted(int(res.metrics[keys.PARTITION_ID]) for _, res in results)
        log.participation.aggregated[server_round] = len(pids)
        losses = [loss for _, res in sorted(results, key=lambda r: int(r[1].metrics[keys.PARTITION_ID]))
                  if (loss := record_client_reply(log, server_round, res.metrics)) is not None]
        if losses:
            log.train_loss[server_round] = sum(losses) / len(losses)
        if not results:
            return None, {}
        # SecAggPlusWorkflow hands every result the same unmasked aggregate: take it as is. Legacy FedAvg's
        # weighted mean of those identical vectors would only add rounding, and divide by the clients'
        # total num_examples (ZeroDivisionError, or NaN, when they sum to 0).
        params, metrics = results[0][1].parameters, {}
        aggregate = parameters_to_ndarrays(params)
        fed = self.scenario.federation
        if log.wants(server_round, AGGREGATE_ID):  # the weight the server learns: the declared num_examples
            self._record(server_round, aggregate, pids, sum(int(res.num_examples) for _, res in results))
        sent = None if self.manipulator is None else self.manipulator.sent.get(server_round)
        if sent is not None:  # the aggregate of the manipulated model, as one of the agreed model (malicious.py)
            raw = {k: torch.from_numpy(np.array(a)) for k, a in zip(sent.layout, aggregate, strict=True)}
            restored = self.manipulator.restore(sent, raw)
            aggregate = [restored[k].numpy() if k in restored else np.zeros_like(c) for k, c in
                         zip(self.names, self.current, strict=True)]
            params = ndarrays_to_parameters(aggregate)
        from fedsim.audit.client_canaries import client_canary_shift, shifted  # lazily: it imports fedsim.simulation

        shift = client_canary_shift(self.scenario, server_round)
        if shift is not None:  # audit: the round's included client canaries join the unmasked aggregate
            state = shifted(self._state(aggregate), shift)
            aggregate = [state[k].numpy().astype(a.dtype, copy=False) for k, a in zip(self.names, aggregate,
                                                                                       strict=True)]
            params = ndarrays_to_parameters(aggregate)
        if fed.protocol == "fedsgd":  # the weighted mean of the messages (zero padding of buffers dropped)
            current = self._state(self.current)
            trainable = _trainable(self.scenario)
            mean = {k: torch.from_numpy(np.array(a)).to(current[k].dtype)
                    for k, a in zip(self.names, aggregate, strict=True) if k in trainable}
            stepped = server_step(self.scenario, server_round, current, mean, self.server_memory)
            return ndarrays_to_parameters([stepped[k].numpy() for k in self.names]), metrics
        return params, metrics

    def _state(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in zip(self.names, arrays, strict=True)}

    def _record(self, rnd: int, aggregate: list[np.ndarray], pids: list[int], declared: int) -> None:
        setup = setup_for(self.scenario)
        global_state = self._state(self.current)
        names, trainable, architecture, manipulated_by = self.names, _trainable(self.scenario), (), None
        sent = None if self.manipulator is None else self.manipulator.sent.get(rnd)
        if sent is not None:  # what the clients were sent: the manipulated model, in its layout
            global_state, names, architecture = dict(sent.state), list(sent.layout), sent.architecture
            manipulated_by = sent.attack_index
            trainable = {n for n, _ in apply_architecture(setup.build_model(), architecture).named_parameters()}
        # SecAgg+ dequantizes to float64: back to the model's dtypes
        agg = {k: torch.from_numpy(np.array(v)).to(global_state[k].dtype)
               for k, v in zip(names, aggregate, strict=True)}
        if self.scenario.federation.protocol == "fedavg":
            update = {k: agg[k] - global_state[k] for k in trainable}
        else:
            update = {k: agg[k] for k in trainable}
        inputs, labels = [], []
        for pid in pids:  # re-derive each aggregated client's batch (see module doc)
            x, y = setup.client_data(pid)
            used = _used_indices(setup, rnd, pid, x)
            inputs.append(x[used])
            labels.append(y[used])
        truth = GroundTruth(rnd, AGGREGATE_ID, torch.cat(inputs), torch.cat(labels))
        reference = None  # a gradient difference (DIFF2): the model the subtracted gradients were taken at
        if any(d.message_reference(rnd) for d in setup.defenses):
            if self.previous is None or self.previous[0] != rnd - 1:
                raise FedsimError(f"round {rnd}: the model of round {rnd - 1}, which the clients' differences "
                                  "were taken against, was not kept")
            reference = self._state(self.previous[1])
        self.outcome.capture.updates.append(CapturedUpdate(rnd, AGGREGATE_ID, global_state, update, declared, truth,
                                                           reference_state=reference, architecture=architecture,
                                                           manipulated_by=manipulated_by))


def _trainable(scenario: Scenario) -> set[str]:
    """Names of the model's parameters: what a fedsgd message holds (the SecAgg+ client pads the rest with 0)."""
    return {n for n, _ in setup_for(scenario).build_model().named_parameters()}


def _used_indices(setup: FederationSetup, rnd: int, pid: int, inputs: torch.Tensor) -> torch.Tensor:
    """The partition indices client ``pid`` used in round ``rnd``, in first-use order: the batches its
    defense-wrapped job draws (:func:`~fedsim.training.round_batches`, as the client's own round does)."""
    fed = setup.scenario.federation
    job = build_job(setup, setup.build_model(), rnd, pid, len(inputs))
    batches = round_batches(job, inputs, local=fed.local, protocol=fed.protocol, seed=setup.scenario.seed,
                            round_num=rnd, partition_id=pid)
    seen: dict[int, None] = {}
    for b in batches:
        seen.update(dict.fromkeys(b.tolist()))
    return torch.tensor(list(seen), dtype=torch.long)


class _RoundsUntilStuck:
    """The SecAgg+ fit workflow, round by round, with the stopping rules applied after each round.

    Once a round fails the policy, later rounds (fit and evaluation) are skipped and the error is kept
    for the ServerApp to raise after Flower's DefaultWorkflow has shut its threads down.
    """

    def __init__(self, inner: SecAggPlusWorkflow, log: CaptureLog, seed: int, threshold: int,
                 every_client: str | None = None) -> None:
        self.inner, self.log, self.seed, self.threshold = inner, log, seed, threshold
        self.every_client = every_client  # why any failed client stops the run (a defense's reason), or None
        self.error: FedsimError | None = None

    def __call__(self, grid: Grid, context: Context) -> None:
        if self.error is not None:
            return
        rnd = int(context.state.config_records[_ROUND_CONFIG][_CURRENT_ROUND])
        saved = random.getstate()
        random.seed(derive_seed(self.seed, "secagg-neighbours", rnd))  # Flower's ring shuffle (module doc)
        try:
            self.inner(grid, context)
        finally:
            random.setstate(saved)
        halted = None if rnd in self.log.participation.aggregated else (
            f"SecAgg+ halted: too few survivors for reconstruction_threshold {self.threshold}")
        try:
            self.log.participation.check(rnd, self.every_client, halted=halted)
        except FedsimError as err:
            self.error = err


def _restated(record: logging.LogRecord) -> bool:
    """Drop Flower's SecAgg+ halt messages: fedsim's own one-line error says the same, with the client's reason."""
    return not str(record.msg).startswith(("Insufficient available nodes", "Not enough shares to recover"))


def _refuse_dropped_hooks(setup: FederationSetup) -> None:
    """Server-side and mod hooks have no place on this path: refuse rather than silently drop them."""
    from fedsim.defenses.base import Defense

    for d in setup.defenses:
        if getattr(d, "secure_aggregation", False):
            continue
        cls = type(d)
        for hook in ("wrap_strategy", "client_mods"):
            if getattr(cls, hook) is not getattr(Defense, hook):
                raise IncompatibleDefenseError(f"defense '{d.name}' uses {hook}, which the SecAgg+ path cannot "
                                               "apply: remove it or secagg")


def _max_weight(setup: FederationSetup) -> float:
    """The largest num-examples a client can declare: its partition under fedavg or when a defense's fedsgd
    messages cover the whole partition (DIFF2), else the batch size."""
    largest = max(len(p) for p in setup.partitions)
    whole = setup.scenario.federation.protocol == "fedavg" or any(
        getattr(d, "full_partition_messages", False) for d in setup.defenses)
    return float(largest if whole else min(setup.scenario.federation.local.batch_size, largest))


def build_secure_server_app(scenario: Scenario, outcome: FederationOutcome, params: Any,
                            on_round: RoundCallback | None = None) -> ServerApp:
    """``params``: the secure-aggregation defense's parameters (num_shares, reconstruction_threshold, ...)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rows = RoundRows(scenario, outcome, on_round)
        setup = setup_for(scenario)
        _refuse_dropped_hooks(setup)
        fed = scenario.federation
        names = list(rows.model.state_dict())
        partition_of_node = discover_partitions(grid, fed.clients)
        fit = _RoundsUntilStuck(SecAggPlusWorkflow(
            num_shares=params.num_shares, reconstruction_threshold=params.reconstruction_threshold,
            # Clients scale their update by num_examples / max_weight before quantizing: a max_weight equal
            # to the largest weight any client can send keeps that ratio near 1 and the quantization error small.
            max_weight=_max_weight(setup),
            clipping_range=params.clipping_range, quantization_range=params.quantization_range,
        ), outcome.capture, scenario.seed, params.reconstruction_threshold, needs_every_client(setup.defenses))

        def evaluate_fn(server_round: int, ndarrays: list[np.ndarray], config: dict) -> tuple[float, dict] | None:
            if fit.error is not None:
                return None

            def state() -> dict[str, torch.Tensor]:
                return {k: torch.from_numpy(np.array(v)) for k, v in zip(names, ndarrays, strict=True)}

            row = rows(server_round, state)
            if server_round == fed.rounds:
                outcome.final_state = state()
            if "test_loss" not in row:
                return None
            accuracy = {"accuracy": row["test_accuracy"]} if "test_accuracy" in row else {}  # none: a regression
            return row["test_loss"], accuracy

        strategy = _CapturingLegacyFedAvg(
            scenario, outcome, names, partition_of_node, fraction_fit=1.0, fraction_evaluate=0.0,
            min_fit_clients=fed.clients, min_available_clients=fed.clients, evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda rnd: {keys.SERVER_ROUND: rnd},
            initial_parameters=ndarrays_to_parameters([v.cpu().numpy() for v in rows.model.state_dict().values()]),
        )
        strategy.manipulator = rows.manipulator
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=strategy)
        flower_log = logging.getLogger("flwr")
        flower_log.addFilter(_restated)
        try:
            DefaultWorkflow(fit_workflow=fit)(_FailureGrid(grid, outcome.capture, partition_of_node), legacy)
        finally:
            flower_log.removeFilter(_restated)
        outcome.seconds = time.perf_counter() - rows.start
        if fit.error is not None:
            raise fit.error

    return app

