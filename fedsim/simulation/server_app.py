"""The ServerApp: learn which node holds which partition, run the strategy behind the capture
proxy, and evaluate the global model on the held-out test set after each round.

The ServerApp runs in a thread of the calling process on every backend, so its results are
written into a plain :class:`FederationOutcome` the caller passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsim.errors import SimulationError
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed, seed_torch
from fedsim.simulation import keys
from fedsim.simulation.capture import CaptureLog, CapturingGrid
from fedsim.simulation.malicious import Manipulator, malicious_attacks
from fedsim.simulation.records import to_record, to_state
from fedsim.simulation.setup import setup_for
from fedsim.simulation.stale_leakage import run_metrics
from fedsim.simulation.strategies import build_strategy
from fedsim.training import evaluate

RoundCallback = Callable[[int, dict[str, float]], None]
PULL_INTERVAL_S = 0.005


@dataclass
class FederationOutcome:
    """What the federation produced: per-round utility, captured updates, the final model, and the
    global models released after the rounds in ``released_rounds`` (for model-inversion attacks)."""

    capture: CaptureLog
    history: list[dict[str, float]] = field(default_factory=list)
    final_state: dict | None = None
    seconds: float = 0.0
    released_rounds: set[int] = field(default_factory=set)
    released: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def keep_released(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Keep a CPU clone of the global model after ``server_round`` if a model attack targets it."""
        if server_round in self.released_rounds:
            self.released[server_round] = {k: v.detach().to("cpu").clone() for k, v in state.items()}


def discover_partitions(grid: Grid, expected: int, timeout: float = 120.0) -> dict[int, int]:
    """Ask every node which partition it holds: {node id: partition id}."""
    deadline = time.time() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.time() > deadline:
            raise SimulationError(f"only {len(node_ids)} of {expected} clients connected")
        time.sleep(0.05)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    mapping = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise SimulationError(f"a client failed to start: {reply.error.reason}")
        mapping[reply.metadata.src_node_id] = int(reply.content[keys.METRICS][keys.PARTITION_ID])
    if sorted(mapping.values()) != list(range(expected)):
        raise SimulationError(f"clients answered for partitions {sorted(mapping.values())}, expected 0..{expected - 1}")
    return mapping


def needs_every_client(defenses: list) -> str | None:
    """Why the first failed client must stop the run (:mod:`fedsim.simulation.participation`), or None: a defense
    wraps the server strategy (its noise assumes every sampled client's update) or states its own reason
    (``Defense.every_client_reason``, e.g. DIFF2's estimator)."""
    from fedsim.defenses.base import Defense

    for d in defenses:
        if type(d).wrap_strategy is not Defense.wrap_strategy:
            return (f"defense '{d.name}' wraps the server strategy, whose noise is calibrated to every sampled "
                    "client's update")
        if getattr(d, "every_client_reason", ""):
            return d.every_client_reason
    return None


def message_references(defenses: list) -> Callable[[int], bool] | None:
    """``round -> bool``: whether the clients send gradient differences in that round (``Defense.message_reference``),
    or None when no defense makes them (the capture then keeps no previous model)."""
    from fedsim.defenses.base import Defense

    chosen = [d for d in defenses if type(d).message_reference is not Defense.message_reference]
    return (lambda rnd: any(d.message_reference(rnd) for d in chosen)) if chosen else None


class RoundRows:
    """The per-round history rows of either server path (plain or SecAgg+): time, mean client train loss,
    participation, test loss and (classification only) accuracy, overall and on each class of
    ``evaluation.class_accuracy``, every ``evaluation.every`` rounds and after the last, and the defenses' server
    metrics. The global model after a model attack's round is kept here too."""

    def __init__(self, scenario: Scenario, outcome: FederationOutcome, on_round: RoundCallback | None) -> None:
        self.scenario, self.outcome, self.on_round = scenario, outcome, on_round
        self.setup = setup_for(scenario)
        self.model = self.setup.build_model()
        self.start = time.perf_counter()
        # round -> what gi_conversion did that round (its estimates of client data, switches), scored here
        self.estimates: Callable[[int], Any] | None = None
        # a malicious server's manipulations (fedsim.simulation.malicious): their accuracy cost goes in the row
        # (only a malicious server manipulates: validation refuses a manipulating attack under any other role)
        malicious = scenario.server.role == "malicious" and bool(malicious_attacks(scenario))
        self.manipulator = Manipulator(scenario) if malicious else None

    def __call__(self, server_round: int, global_state: Callable[[], dict[str, torch.Tensor]]) -> dict[str, float]:
        """Append (and return) round ``server_round``'s row; ``global_state()`` gives the global model after it."""
        scenario, outcome, setup = self.scenario, self.outcome, self.setup
        row: dict[str, float] = {"round": server_round, "seconds": time.perf_counter() - self.start}
        if server_round in outcome.capture.train_loss:
            row["train_loss"] = outcome.capture.train_loss[server_round]
        row.update(outcome.capture.participation.row(server_round))
        if scenario.federation.staleness is not None and server_round > 0:  # clients sent an old model this round
            row["clients_stale"] = outcome.capture.stale.get(server_round, 0)
        if self.manipulator is not None:  # an attacked round: the sent model's accuracy beside the honest one's
            row.update(self.manipulator.row(server_round))
        if self.estimates is not None:  # the privacy price of gi_conversion: its estimates against the true data
            row.update(run_metrics(self.estimates(server_round), setup))
        last = server_round == scenario.federation.rounds
        if server_round in outcome.released_rounds:  # a model-inversion attack's target (always the final)
            outcome.keep_released(server_round, global_state())
        if server_round % scenario.evaluation.every == 0 or last:
            self.model.load_state_dict(global_state())
            data = setup.data
            # Stochastic models (MID samples its bottleneck in eval mode too) evaluate under a seed
            # per round, in a forked RNG so no other draw shifts.
            with torch.random.fork_rng(devices=[]):
                seed_torch(derive_seed(scenario.seed, "eval", server_round))
                loss, acc = evaluate(self.model, data.test_x, data.test_y, mean=data.mean, std=data.std,
                                     batch_size=scenario.evaluation.batch_size, device=setup.device, task=data.task)
                for k in scenario.evaluation.class_accuracy:  # e.g. the slow clients' class (spec 12.1's headline)
                    of_k = data.test_y == k
                    row[f"test_accuracy_class{k}"] = evaluate(
                        self.model, data.test_x[of_k], data.test_y[of_k], mean=data.mean, std=data.std,
                        batch_size=scenario.evaluation.batch_size, device=setup.device, task=data.task)[1]
            row["test_loss"] = loss  # cross-entropy, or a regression's mean squared error
            if acc is not None:  # a regression has no accuracy: the row has no test_accuracy key at all
                row["test_accuracy"] = acc  # language modeling: next-token top-1 accuracy
            if data.task == "language_modeling":  # exp of the mean next-token cross-entropy (nats)
                row["test_perplexity"] = math.exp(min(loss, 700.0))
        for defense in setup.defenses:
            row.update(defense.server_round_metrics(server_round))
        outcome.history.append(row)
        if self.on_round is not None:
            self.on_round(server_round, row)
        return row


def build_server_app(
    scenario: Scenario, outcome: FederationOutcome, on_round: RoundCallback | None = None
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rows = RoundRows(scenario, outcome, on_round)
        if hasattr(grid, "pull_interval"):  # Flower's InMemoryGrid (Ray) polls replies every 0.1 s by default:
            grid.pull_interval = PULL_INTERVAL_S  # most of a small round's Ray overhead (benchmarks/sim_overhead.py)
        setup = setup_for(scenario)
        fed = scenario.federation
        partition_of_node = discover_partitions(grid, fed.clients)
        node_of_partition = {p: n for n, p in partition_of_node.items()}
        strategy = build_strategy(scenario, node_of_partition)
        if getattr(strategy, "stale", None) is not None:
            rows.estimates = strategy.stale.take_round
        for defense in setup.defenses:
            strategy = defense.wrap_strategy(strategy)
        # audit: the client canaries' replies join the real ones, outside every defense's wrapper (fedsim.audit;
        # imported here: it reads fedsim.simulation.keys, whose package imports this module)
        from fedsim.audit.client_canaries import wrap_with_client_canaries

        strategy = wrap_with_client_canaries(strategy, scenario, setup.defenses)
        proxy = CapturingGrid(grid, outcome.capture, partition_of_node, needs_every_client(setup.defenses),
                              message_references(setup.defenses), rows.manipulator)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            row = rows(server_round, lambda: to_state(arrays))
            return MetricRecord({k: v for k, v in row.items() if k != "round"})

        initial = to_record(rows.model.state_dict())
        result = strategy.start(
            grid=proxy, initial_arrays=initial, num_rounds=fed.rounds,
            train_config=ConfigRecord(), evaluate_fn=evaluate_fn,
        )
        # Flower's Result keeps only aggregated arrays: when every round was refused by every client
        # (fedsim.simulation.participation) it holds none, and the global model is still the initial one
        final = result.arrays if result.arrays is not None and len(result.arrays) else initial
        outcome.final_state = to_state(final)
        outcome.seconds = time.perf_counter() - rows.start

    return app
