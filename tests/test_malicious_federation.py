"""A malicious server inside the real Flower federation (fedsim.simulation.malicious), on both server paths.

The manipulations here are test-only plug-ins registered by the tests (independent of the real attacks): one adds a
linear block on the flattened input through a test-registered architecture change, one scales a layer. Expected
gradients and global models are recomputed independently (torch autograd on the client's recorded batch, the
FedSGD step written out), never read from the code under test.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.attacks import ATTACKS
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.data import normalize
from fedsim.errors import ScenarioError
from fedsim.models.manipulation import ARCHITECTURE_CHANGES
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ManipulationView, Reconstruction, ServerModel

BLOCK = "test_block"
GAIN = 2.0  # the block multiplies the flattened input by GAIN * I (so the model sent differs from the honest one)
SCALE = 10.0


def add_block(model: nn.Module, description: dict[str, Any]) -> nn.Module:
    """The test's architecture change: a square linear map on the flattened input, run by a forward pre-hook."""
    d = int(description["features"])
    model.add_module(BLOCK, nn.Linear(d, d))

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (getattr(module, BLOCK)(x.flatten(1)).view_as(x),)

    model.register_forward_pre_hook(hook)
    return model


class _Base(MaliciousAttack):
    threat_model: ClassVar[str] = "F"

    def reconstruct(self, update, progress=None) -> Reconstruction:  # noqa: ANN001
        return Reconstruction.failure("test attack: reconstruction not tested here")


class BlockAttack(_Base):
    changes_architecture: ClassVar[bool] = True

    def manipulate(self, view: ManipulationView) -> ServerModel:
        d = 1
        for s in view.task.input_shape:
            d *= s
        state = dict(view.global_state)
        state[f"{BLOCK}.weight"] = GAIN * torch.eye(d)
        state[f"{BLOCK}.bias"] = torch.zeros(d)
        return ServerModel(state, ({"name": BLOCK, "features": d},), note="test block")


class ScaleAttack(_Base):
    matches_differences: ClassVar[bool] = True  # so only the federation's own refusal of DIFF2 applies
    def manipulate(self, view: ManipulationView) -> ServerModel:
        name = next(k for k, v in view.global_state.items() if v.dim() == 2)
        state = {k: (v * SCALE if k == name else v) for k, v in view.global_state.items()}
        return ServerModel(state, note="scaled first layer")


@pytest.fixture(autouse=True)
def _plugins():
    """Register the test-only attacks and architecture change for one test, then remove them."""
    added = {"test_block_attack": BlockAttack, "test_scale_attack": ScaleAttack}
    for name, cls in added.items():
        ATTACKS.add(name, cls)
    ARCHITECTURE_CHANGES.add(BLOCK, add_block)
    yield
    for name in added:
        ATTACKS._items.pop(name, None)
    ARCHITECTURE_CHANGES._items.pop(BLOCK, None)


def scenario_raw(tiny_raw: dict, attack: str = "test_block_attack", protocol: str = "fedsgd",
                 rounds: int = 1) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["server"] = {"role": "malicious"}
    raw["federation"].update(rounds=rounds, protocol=protocol)
    raw["attacks"] = [
        {"name": attack, "rounds": [1], "clients": [1], "knowledge": {"local_hparams": True}},
        # an honest attack on every client only so the capture keeps every client's update and batch
        {"name": "inverting_gradients", "rounds": [1], "clients": "all", "budget": {"iterations": 1}},
    ]
    return raw


def manipulated_model(setup, state: dict, architecture: tuple) -> nn.Module:
    """The model a client trains, built here without fedsim's apply_architecture."""
    model = setup.build_model()
    for d in architecture:
        model = add_block(model, d)
    model.load_state_dict(state)
    return model


def gradient(model: nn.Module, setup, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cross-entropy gradient on (x, y) in pixel space (the FedSGD client's message)."""
    model.train()
    data = setup.data
    loss = F.cross_entropy(model(normalize(x, data.mean, data.std)), y)
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))


def by_client(outcome) -> dict[int, Any]:
    return {u.partition_id: u for u in outcome.capture.updates}


def test_targeted_client_trains_on_the_manipulated_model_and_the_federation_stays_agreed(tiny_raw) -> None:
    scenario = parse_scenario(scenario_raw(tiny_raw))
    setup = setup_for(scenario)
    honest = setup.build_model().state_dict()
    outcome = run_federation(scenario)
    caps = by_client(outcome)
    assert sorted(caps) == [0, 1, 2, 3]
    target = caps[1]
    assert target.architecture and target.architecture[0]["name"] == BLOCK
    assert torch.equal(target.global_state[f"{BLOCK}.weight"], GAIN * torch.eye(64))
    for k, v in honest.items():  # the agreed part of the sent model is the honest one (the block is the change)
        assert torch.equal(target.global_state[k], v)
    expected = gradient(manipulated_model(setup, target.global_state, target.architecture), setup,
                        target.truth.inputs, target.truth.labels)
    assert set(target.update) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(target.update[k], g, rtol=1e-5, atol=1e-6)
    honest_grads = {}
    for pid, cap in caps.items():
        if pid == 1:
            continue
        assert cap.architecture == () and set(cap.global_state) == set(honest)
        for k, v in honest.items():
            assert torch.equal(cap.global_state[k], v)
        honest_grads[pid] = gradient(manipulated_model(setup, honest, ()), setup, cap.truth.inputs, cap.truth.labels)
    # the federation goes on with the agreed model: w1 = w0 - lr * mean of the agreed parts (equal batches)
    messages = [honest_grads[0], {k: expected[k] for k in honest_grads[0]}, honest_grads[2], honest_grads[3]]
    lr = scenario.federation.local.lr
    final = outcome.final_state
    assert set(final) == set(honest)
    for k, v in honest.items():
        want = v - lr * sum(m[k] for m in messages) / 4 if k in messages[0] else v
        torch.testing.assert_close(final[k], want, rtol=1e-5, atol=1e-6)
    row = next(h for h in outcome.history if h["round"] == 1)
    assert row["manipulated_clients"] == 1
    assert row["honest_test_accuracy"] - row["sent_test_accuracy"] == pytest.approx(row["sent_accuracy_drop"])
    assert "manipulated_clients" not in next(h for h in outcome.history if h["round"] == 0)


def test_fedavg_restores_the_honest_model_plus_the_local_change(tiny_raw) -> None:
    scenario = parse_scenario(scenario_raw(tiny_raw, protocol="fedavg"))
    setup = setup_for(scenario)
    honest = setup.build_model().state_dict()
    outcome = run_federation(scenario)
    caps = by_client(outcome)
    # fedavg capture: update = local weights - the model sent; the agreed mean of honest + each client's change
    changes = [{k: caps[p].update[k] for k in honest} for p in range(4)]
    weights = [caps[p].num_examples for p in range(4)]
    assert set(caps[1].update) > set(honest)  # the block's weights changed too
    final = outcome.final_state
    assert set(final) == set(honest)
    for k, v in honest.items():
        want = v + sum(w * c[k] for w, c in zip(weights, changes, strict=True)) / sum(weights)
        torch.testing.assert_close(final[k], want, rtol=1e-4, atol=1e-5)


def test_secagg_path_sends_every_client_the_block_and_restores_the_aggregate(tiny_raw) -> None:
    raw = scenario_raw(tiny_raw)
    raw["defenses"] = [{"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}]
    scenario = parse_scenario(raw)
    setup = setup_for(scenario)
    honest = setup.build_model().state_dict()
    outcome = run_federation(scenario)
    (agg,) = outcome.capture.updates
    assert agg.architecture and agg.architecture[0]["name"] == BLOCK
    assert torch.equal(agg.global_state[f"{BLOCK}.weight"], GAIN * torch.eye(64))
    # the aggregate is the mean gradient of the MANIPULATED model over every client's batch (equal batches)
    model = manipulated_model(setup, agg.global_state, agg.architecture)
    per_client = [gradient(model, setup, agg.truth.inputs[4 * i: 4 * i + 4], agg.truth.labels[4 * i: 4 * i + 4])
                  for i in range(4)]
    mean = {k: sum(g[k] for g in per_client) / 4 for k in per_client[0]}
    assert set(agg.update) == set(mean)
    for k, g in mean.items():  # SecAgg+ quantization error only
        torch.testing.assert_close(agg.update[k], g, rtol=0, atol=2e-3)
    row = next(h for h in outcome.history if h["round"] == 1)
    assert row["manipulated_clients"] == 4
    lr = scenario.federation.local.lr
    assert set(outcome.final_state) == set(honest)
    for k, v in honest.items():
        want = v - lr * mean[k] if k in mean else v
        torch.testing.assert_close(outcome.final_state[k], want, rtol=0, atol=2e-3)


def test_validation_refuses_a_malicious_attack_without_a_malicious_server(tiny_raw) -> None:
    raw = scenario_raw(tiny_raw)
    raw["server"] = {"role": "honest_but_curious"}
    with pytest.raises(ScenarioError, match=r"server\.role"):
        parse_scenario(raw)


def test_validation_refuses_two_manipulations_in_one_round(tiny_raw) -> None:
    raw = scenario_raw(tiny_raw)
    raw["attacks"].append({"name": "test_scale_attack", "rounds": [1], "clients": [2],
                           "knowledge": {"local_hparams": True}})
    with pytest.raises(ScenarioError, match=r"attacks\[2\]\.rounds.*also manipulated by attacks\[0\]"):
        parse_scenario(raw)
    raw["attacks"][2]["rounds"] = [2]
    raw["federation"]["rounds"] = 2
    parse_scenario(raw)  # different rounds: fine


def test_model_check_refuses_the_added_block_and_every_output_says_why(tiny_raw, tmp_path) -> None:
    import json

    from fedsim.run import run_scenario

    raw = scenario_raw(tiny_raw)
    raw["defenses"] = [{"name": "model_check"}]
    result = run_scenario(parse_scenario(raw), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (failure,) = metrics["client_failures"]
    assert failure["round"] == 1 and failure["client"] == 1
    assert "ModelRefusedError" in failure["reason"] and BLOCK in failure["reason"]
    row = next(h for h in metrics["utility"] if h["round"] == 1)
    assert row["clients_failed"] == 1 and row["clients_aggregated"] == 3 and row["manipulated_clients"] == 1
    refused = [o for o in result.outcomes if o.attack == "test_block_attack"]
    assert len(refused) == 1 and "client 1 failed in round 1" in refused[0].failed
    assert "ModelRefusedError" in refused[0].failed
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "ModelRefusedError" in summary
    report = (tmp_path / "run" / "report.html").read_text()
    assert "ModelRefusedError" in report
    for text in (summary, report):  # the manipulated round's cost is shown beside the participation
        assert "Malicious server" in text and f"{row['sent_test_accuracy']:.3f}" in text
    # the honest clients passed the statistics check unflagged
    assert all(m["model_check_flagged"] == 0 for m in result.client_metrics[1].values())


@pytest.mark.parametrize("action", ["flag", "refuse"])
def test_model_check_flags_a_scaled_layer(tiny_raw, action) -> None:
    raw = scenario_raw(tiny_raw, attack="test_scale_attack", rounds=2)
    raw["defenses"] = [{"name": "model_check", "params": {"action": action}}]
    outcome = run_federation(parse_scenario(raw))
    flags = {r: {p: m["model_check_flagged"] for p, m in per.items()} for r, per in
             outcome.capture.client_metrics.items()}
    if action == "flag":
        assert flags[1] == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
        assert outcome.capture.client_metrics[1][1]["model_check_layer"] == 0  # the first weight tensor
        assert outcome.capture.client_metrics[1][1]["model_check_norm_ratio"] == pytest.approx(SCALE, rel=1e-5)
    else:
        assert flags[1] == {0: 0.0, 2: 0.0, 3: 0.0}
        (failure,) = outcome.capture.participation.failures
        assert failure.partition_id == 1 and "abnormal weights" in failure.reason
    assert set(flags[2].values()) == {0.0}  # round 2 is honest: no client flags it


def test_dp_sgd_trains_on_a_model_with_an_added_module(tiny_raw) -> None:
    raw = scenario_raw(tiny_raw)
    raw["defenses"] = [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}]
    outcome = run_federation(parse_scenario(raw))
    target = by_client(outcome)[1]
    assert f"{BLOCK}.weight" in target.update and torch.isfinite(target.update[f"{BLOCK}.weight"]).all()
    assert outcome.capture.participation.failures == []


@pytest.mark.ray
@pytest.mark.slow
def test_inprocess_and_ray_agree_on_a_malicious_round(tiny_raw) -> None:
    """A weight-only manipulation (the test's architecture change is registered in this process only: a Ray
    worker knows the changes the attack plug-in modules register, which the test's is not)."""
    raw = scenario_raw(tiny_raw, attack="test_scale_attack", protocol="fedavg", rounds=2)
    raw["defenses"] = [{"name": "model_check"}]
    raw["attacks"][0]["rounds"] = [2]
    raw["attacks"][1]["rounds"] = [2]
    raw["backend"] = {"kind": "ray", "client_resources": {"num_cpus": 1}}
    scenario = parse_scenario(raw)
    local, ray = run_federation(scenario, backend="inprocess"), run_federation(scenario, backend="ray")
    for a, b in zip(local.history, ray.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    for k, v in local.final_state.items():
        assert torch.equal(v, ray.final_state[k])
    assert local.capture.client_metrics == ray.capture.client_metrics
    assert local.capture.client_metrics[2][1]["model_check_flagged"] == 1.0
    assert next(h for h in local.history if h["round"] == 2)["manipulated_clients"] == 1


def test_validation_refuses_stale_clients_and_gradient_differences(tiny_raw) -> None:
    raw = scenario_raw(tiny_raw, protocol="fedavg", rounds=3)
    raw["federation"].update(clients_per_round=2, staleness={"tau": 1, "slow_clients": [1], "schedule": "round_robin"})
    with pytest.raises(ScenarioError, match=r"federation\.staleness.*attacks\[0\]"):
        parse_scenario(raw)
    raw = scenario_raw(tiny_raw, attack="test_scale_attack")
    raw["defenses"] = [{"name": "diff2", "params": {"restart_period": 2, "c1": 1.0, "c2": 0.1,
                                                     "target_epsilon": 8.0, "delta": 1e-5}}]
    with pytest.raises(ScenarioError, match=r"defenses\[0\].*gradient differences.*attacks\[0\]"):
        parse_scenario(raw)

