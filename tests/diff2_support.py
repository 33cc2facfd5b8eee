"""Shared by the DIFF2 tests (test_diff2.py, test_diff2_runs.py): tiny scenarios, cached federations, and
independent computations (per-example autograd) of what a DIFF2 client sends."""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from fedsim.data import normalize
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for

SECAGG = {"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}
BASE = {
    "name": "diff2-test", "seed": 3, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 80, "partition": {"kind": "iid"}},  # 4 clients x 20 digits
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": 4, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 4, "lr": 0.5}},
    "backend": {"kind": "inprocess"},
    "evaluation": {"every": 100},
    "attacks": [],
}
NOISY = {"restart_period": 2, "c1": 1.0, "c2": 2.0, "sigma1": 0.05, "sigma2": 0.1, "chunk_size": 7}


def scenario_raw(params: dict, rounds: int = 2, secure: bool = False, capture: bool = False) -> dict:
    raw = copy.deepcopy(BASE)
    raw["federation"]["rounds"] = rounds
    raw["defenses"] = [{"name": "diff2", "params": params}] + ([SECAGG] if secure else [])
    if capture:  # targets make the capture record updates (the attacks themselves do not run here)
        raw["attacks"] = [{"name": "inverting_gradients", "rounds": [1, 2], "clients": "all",
                           "knowledge": {"labels": "known"}, "budget": {"iterations": 1}}]
    return raw


@lru_cache(maxsize=16)
def _run(text: str):  # noqa: ANN202 - one federation per distinct scenario, shared by the tests
    return run_federation(parse_scenario(json.loads(text)))


def run(raw: dict):  # noqa: ANN201
    return _run(json.dumps(raw, sort_keys=True))


def client_batches(raw: dict) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.nn.Module]:
    """Each client's whole partition, normalized as the clients do, and the initial global model."""
    setup = setup_for(parse_scenario(raw))
    data = [setup.client_data(p) for p in range(raw["federation"]["clients"])]
    return [(normalize(x, setup.task.mean, setup.task.std), y) for x, y in data], setup.build_model()


def brute_message(model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, clip: float | None,
                  reference: dict | None = None) -> dict[str, torch.Tensor]:
    """(1/n) sum_i clip(grad l(state; z_i) [- grad l(reference; z_i)]) by one autograd call per example."""
    model = copy.deepcopy(model)
    names = [k for k, _ in model.named_parameters()]

    def grad_at(weights: dict, i: int) -> list[torch.Tensor]:
        model.load_state_dict(weights, strict=False)
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        return [g.detach().clone() for g in torch.autograd.grad(loss, list(model.parameters()))]

    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        g = grad_at(state, i)
        if reference is not None:
            g = [a - b for a, b in zip(g, grad_at(reference, i), strict=True)]
        scale = 1.0 if clip is None else min(1.0, clip / float(torch.sqrt(sum((t**2).sum() for t in g))))
        total = [t + scale * a for t, a in zip(total, g, strict=True)]
    return {k: t / len(x) for k, t in zip(names, total, strict=True)}


def params_of(state: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: state[k] for k, _ in model.named_parameters()}


def captured(outcome, rnd: int) -> dict:  # noqa: ANN001
    return {u.partition_id: u for u in outcome.capture.updates if u.round == rnd}


def assert_standard_normal(values: torch.Tensor) -> None:
    """Mean 0 and std 1 within 5 standard errors of a sample of n: 1/sqrt(n) for the mean, 1/sqrt(2n) for the std."""
    n = values.numel()
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    assert abs(float(values.std()) - 1) < 5 / math.sqrt(2 * n)
