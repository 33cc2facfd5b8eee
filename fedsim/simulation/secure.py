"""Secure aggregation with Flower's SecAgg+ workflow: the curious server sees only the aggregate.

SecAgg+ exists in Flower 1.41/1.42 only on the legacy path (``secaggplus_mod`` converts replies
with ``recorddict_to_fitres``), so this module builds a legacy ``ClientApp(client_fn=..., mods=
[secaggplus_mod])`` around a ``NumPyClient`` that runs fedsim's own :func:`local_update`, and a
``ServerApp`` running ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy
strategy. The capture point is that strategy's ``aggregate_fit``: under SecAgg+ it receives only
the unmasked aggregate (the weighted mean of the clients' updates, quantized), which is exactly what
the server learns. The attack then targets that aggregate as one update of the union of all
clients' batches.

Ground truth cannot ride along (the masked vectors are all a client sends), so the evaluator
re-derives each client's batch from the same (seed, round, partition id) draws the client used.
Every client trains every round (SecAgg+ here samples all nodes; partial participation is refused).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed, torch_generator
from fedsim.simulation import keys
from fedsim.simulation.capture import AGGREGATE_ID, CapturedUpdate
from fedsim.simulation.server_app import FederationOutcome, RoundCallback
from fedsim.simulation.setup import FederationSetup, setup_for
from fedsim.threat import GroundTruth
from fedsim.training import TrainingJob, batch_schedule, evaluate, local_update


def _job(setup: FederationSetup, model: torch.nn.Module, rnd: int, pid: int, n: int) -> TrainingJob:
    job = TrainingJob(model, seed=setup.scenario.seed, round=rnd, partition_id=pid, num_examples=n)
    for defense in setup.defenses:
        job = defense.wrap_training(job)
    return job


class _SecureClient(NumPyClient):
    def __init__(self, scenario: Scenario, partition_id: int) -> None:
        self.scenario, self.pid = scenario, partition_id

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
        setup = setup_for(self.scenario)
        rnd = int(config[keys.SERVER_ROUND])
        model = setup.build_model()
        names = list(model.state_dict())
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(names, parameters, strict=True)})
        inputs, labels = setup.client_data(self.pid)
        fed = self.scenario.federation
        result = local_update(_job(setup, model, rnd, self.pid, len(inputs)), inputs, labels, local=fed.local,
                              protocol=fed.protocol, mean=setup.task.mean, std=setup.task.std,
                              seed=self.scenario.seed, round_num=rnd, partition_id=self.pid, device=setup.device)
        if fed.protocol == "fedsgd":  # the gradient, padded with zeros for buffers so every reply has one layout
            sent = [result.update.get(k, torch.zeros_like(v)).cpu().numpy() for k, v in model.state_dict().items()]
        else:
            sent = [result.update[k].cpu().numpy() for k in names]
        # secaggplus_mod quantizes with stochastic rounding from NumPy's global generator: seed it
        np.random.seed(derive_seed(self.scenario.seed, "secagg-rounding", rnd, self.pid) % 2**32)
        return sent, result.num_examples, {}


def build_secure_client_app(scenario: Scenario) -> ClientApp:
    def client_fn(context: Context):  # noqa: ANN202 - Flower's legacy Client
        return _SecureClient(scenario, int(context.node_config[keys.PARTITION_ID])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class _CapturingLegacyFedAvg(LegacyFedAvg):
    """Legacy FedAvg (fedsgd: one server step on the mean gradient) that records the aggregate it receives."""

    def __init__(self, scenario: Scenario, outcome: FederationOutcome, names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario, self.outcome, self.names = scenario, outcome, names
        self.current: list[np.ndarray] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        self.current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> Any:
        if failures:
            raise RuntimeError(f"{len(failures)} client(s) failed in secure aggregation round {server_round}")
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return params, metrics
        aggregate = parameters_to_ndarrays(params)  # every result is the same unmasked aggregate
        fed = self.scenario.federation
        if self.outcome.capture.wants(server_round, AGGREGATE_ID):
            self._record(server_round, aggregate)
        if fed.protocol == "fedsgd":
            lr = fed.server_lr or fed.local.lr
            grads = dict(zip(self.names, aggregate, strict=True))
            stepped = [c - lr * grads[k].astype(c.dtype) if c.dtype.kind == "f" else c
                       for k, c in zip(self.names, self.current, strict=True)]
            return ndarrays_to_parameters(stepped), metrics
        return params, metrics

    def _record(self, rnd: int, aggregate: list[np.ndarray]) -> None:
        setup = setup_for(self.scenario)
        global_state = {k: torch.from_numpy(np.array(v)) for k, v in zip(self.names, self.current, strict=True)}
        # SecAgg+ dequantizes to float64: back to the model's dtypes
        agg = {k: torch.from_numpy(np.array(v)).to(global_state[k].dtype)
               for k, v in zip(self.names, aggregate, strict=True)}
        trainable = {n for n, _ in setup.build_model().named_parameters()}
        if self.scenario.federation.protocol == "fedavg":
            update = {k: agg[k] - global_state[k] for k in trainable}
        else:
            update = {k: agg[k] for k in trainable}
        inputs, labels, total = [], [], 0
        for pid in range(self.scenario.federation.clients):  # re-derive each client's batch (see module doc)
            x, y = setup.client_data(pid)
            used = _used_indices(setup, rnd, pid, len(x))
            inputs.append(x[used])
            labels.append(y[used])
            total += len(used)
        truth = GroundTruth(rnd, AGGREGATE_ID, torch.cat(inputs), torch.cat(labels))
        self.outcome.capture.updates.append(CapturedUpdate(rnd, AGGREGATE_ID, global_state, update, total, truth))


def _used_indices(setup: FederationSetup, rnd: int, pid: int, n: int) -> torch.Tensor:
    fed = setup.scenario.federation
    job = _job(setup, setup.build_model(), rnd, pid, n)
    gen = torch_generator(setup.scenario.seed, "batches", rnd, pid)
    batches = (job.sample_batches or batch_schedule)(n, fed.local, fed.protocol, gen)
    seen: dict[int, None] = {}
    for b in batches:
        seen.update(dict.fromkeys(b.tolist()))
    return torch.tensor(list(seen), dtype=torch.long)


def build_secure_server_app(scenario: Scenario, outcome: FederationOutcome, params: Any,
                            on_round: RoundCallback | None = None) -> ServerApp:
    """``params``: the secure-aggregation defense's parameters (num_shares, reconstruction_threshold, ...)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = time.perf_counter()
        setup = setup_for(scenario)
        fed, data = scenario.federation, setup.data
        model = setup.build_model()
        names = list(model.state_dict())

        def evaluate_fn(server_round: int, ndarrays: list[np.ndarray], config: dict) -> tuple[float, dict]:
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(names, ndarrays, strict=True)})
            outcome.keep_released(server_round, model.state_dict())
            loss, acc = evaluate(model, data.test_x, data.test_y, mean=data.mean, std=data.std,
                                 batch_size=scenario.evaluation.batch_size, device=setup.device)
            row = {"round": server_round, "seconds": time.perf_counter() - start, "test_loss": loss,
                   "test_accuracy": acc}
            outcome.history.append(row)
            if on_round is not None:
                on_round(server_round, row)
            return loss, {"accuracy": acc}

        strategy = _CapturingLegacyFedAvg(
            scenario, outcome, names, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=fed.clients,
            min_available_clients=fed.clients, evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda rnd: {keys.SERVER_ROUND: rnd},
            initial_parameters=ndarrays_to_parameters([v.cpu().numpy() for v in model.state_dict().values()]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=strategy)
        # Clients scale their update by num_examples / max_weight before quantizing: a max_weight equal to
        # the largest weight any client can send keeps that ratio near 1 and the quantization error small.
        max_weight = float(max(len(p) for p in setup.partitions) if fed.protocol == "fedavg"
                           else min(fed.local.batch_size, max(len(p) for p in setup.partitions)))
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=params.num_shares, reconstruction_threshold=params.reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=params.clipping_range, quantization_range=params.quantization_range,
        ))
        workflow(grid, legacy)
        outcome.seconds = time.perf_counter() - start

    return app
