"""The federation loop: utility per round, reproducibility, and the honest-but-curious capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedsim.data import normalize
from fedsim.errors import SimulationError
from fedsim.models import build_model
from fedsim.scenario import parse_scenario
from fedsim.simulation import keys, run_federation
from fedsim.simulation import strategies as strategies_mod
from fedsim.simulation.setup import setup_for
from fedsim.simulation.strategies import sample_partitions
from fedsim.training import TrainingJob, local_update


def utility(history):
    return [(h["round"], h.get("test_loss"), h.get("test_accuracy"), h.get("train_loss")) for h in history]


def test_inprocess_federation_reports_utility_every_round(tiny_raw) -> None:
    """The reported test accuracy and loss of the final model equal a plain evaluation of the final
    weights, written here (not fedsim.training.evaluate), and the loss fell."""
    tiny_raw["federation"]["rounds"] = 3
    scenario = parse_scenario(tiny_raw)
    outcome = run_federation(scenario)
    rounds = [h["round"] for h in outcome.history]
    assert rounds == [0, 1, 2, 3]
    assert outcome.history[-1]["test_loss"] < outcome.history[0]["test_loss"]  # FedSGD makes progress
    setup = setup_for(scenario)
    model = setup.build_model()
    model.load_state_dict(outcome.final_state)
    model.eval()
    data = setup.data
    with torch.no_grad():
        logits = model(normalize(data.test_x, data.mean, data.std))
    correct = int((logits.argmax(1) == data.test_y).sum())
    assert outcome.history[-1]["test_accuracy"] == pytest.approx(correct / len(data.test_y), rel=1e-6)
    assert outcome.history[-1]["test_loss"] == pytest.approx(F.cross_entropy(logits, data.test_y).item(), rel=1e-5)


def test_same_seed_gives_identical_numbers_and_updates(tiny_raw) -> None:
    a = run_federation(parse_scenario(tiny_raw))
    b = run_federation(parse_scenario(tiny_raw))
    assert utility(a.history) == utility(b.history)
    ua, ub = a.capture.updates[0].update, b.capture.updates[0].update
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    tiny_raw["seed"] = 8
    c = run_federation(parse_scenario(tiny_raw))
    assert utility(c.history) != utility(a.history)


def test_capture_holds_exactly_the_targeted_updates(tiny_raw) -> None:
    tiny_raw["federation"]["rounds"] = 3
    tiny_raw["attacks"][0].update(rounds=[1, 3], clients=[0, 2])
    outcome = run_federation(parse_scenario(tiny_raw))
    got = sorted((u.round, u.partition_id) for u in outcome.capture.updates)
    assert got == [(1, 0), (1, 2), (3, 0), (3, 2)]


def test_fedsgd_ground_truth_is_the_batch_behind_the_gradient(tiny_raw) -> None:
    scenario = parse_scenario(tiny_raw)
    outcome = run_federation(scenario)
    (cap,) = outcome.capture.updates
    setup = setup_for(scenario)
    inputs, labels = setup.client_data(cap.partition_id)
    # every ground-truth image is one of this client's images, with its label
    for x, y in zip(cap.truth.inputs, cap.truth.labels, strict=True):
        hits = [(inputs[i] == x).all() and labels[i] == y for i in range(len(inputs))]
        assert any(hits)
    assert cap.num_examples == len(cap.truth.inputs) == 4
    # and the captured update is exactly the gradient of that batch at the global weights
    model = build_model(scenario.model, setup.data.input_shape, setup.data.num_classes)
    model.load_state_dict(cap.global_state)
    loss = F.cross_entropy(model(normalize(cap.truth.inputs, setup.data.mean, setup.data.std)), cap.truth.labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(cap.update[name], g)


def test_fedavg_capture_is_the_weight_delta_of_the_local_steps(tiny_raw) -> None:
    tiny_raw["federation"].update(protocol="fedavg", local={"batch_size": 3, "lr": 0.2, "steps": 3})
    scenario = parse_scenario(tiny_raw)
    (cap,) = run_federation(scenario).capture.updates
    setup = setup_for(scenario)
    model = build_model(scenario.model, setup.data.input_shape, setup.data.num_classes)
    model.load_state_dict(cap.global_state)
    inputs, labels = setup.client_data(cap.partition_id)
    result = local_update(TrainingJob(model), inputs, labels, local=scenario.federation.local, protocol="fedavg",
                          mean=setup.data.mean, std=setup.data.std, seed=scenario.seed, round_num=cap.round,
                          partition_id=cap.partition_id, device=torch.device("cpu"), record=True)
    for name, delta in cap.update.items():
        torch.testing.assert_close(delta, result.update[name] - cap.global_state[name])
    assert torch.equal(cap.truth.inputs, inputs[result.used_indices])
    assert cap.truth.extras["batch_schedule"].shape == (3, 3)


def test_ground_truth_never_reaches_the_strategy(tiny_raw, monkeypatch) -> None:
    seen = []
    original = strategies_mod.FedSGD.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.extend(keys.TRUTH in r.content for r in replies)
        return original(self, server_round, replies)

    monkeypatch.setattr(strategies_mod.FedSGD, "aggregate_train", spy)
    outcome = run_federation(parse_scenario(tiny_raw))
    assert len(seen) == 8 and not any(seen)
    assert len(outcome.capture.updates) == 1  # ...while the evaluator still got it


def test_partial_participation_is_seeded_by_round_not_by_node_ids(tiny_raw) -> None:
    picks = [sample_partitions(7, r, 10, 3) for r in range(1, 6)]
    assert picks == [sample_partitions(7, r, 10, 3) for r in range(1, 6)]
    assert len({tuple(p) for p in picks}) > 1 and all(len(p) == 3 for p in picks)
    tiny_raw["federation"]["clients_per_round"] = 2
    tiny_raw["attacks"][0].update(clients="all", rounds=[1, 2])
    outcome = run_federation(parse_scenario(tiny_raw))
    got = sorted((u.round, u.partition_id) for u in outcome.capture.updates)
    expected = sorted((r, p) for r in (1, 2) for p in sample_partitions(7, r, 4, 2))
    assert got == expected


def test_gaussian_noise_defense_changes_the_update_by_the_recorded_noise(tiny_raw) -> None:
    clean = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    tiny_raw["defenses"] = [{"name": "gaussian_noise", "params": {"sigma": 0.05}}]
    noisy = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    for name, value in clean.update.items():
        noise = noisy.truth.extras[f"gaussian_noise/noise/{name}"]
        torch.testing.assert_close(noisy.update[name], value + noise)
        assert 0.03 < noise.std() < 0.07


def test_a_failing_client_fails_the_run_loudly(tiny_raw, monkeypatch) -> None:
    import fedsim.simulation.client_round as client_app

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client_app, "local_update", boom)
    with pytest.raises(SimulationError, match="disk on fire"):
        run_federation(parse_scenario(tiny_raw))


def test_training_hooks_report_metrics_and_keep_state_across_rounds(tiny_raw) -> None:
    """A defense's wrap_training can count rounds in per-client state and report it (as DP does with epsilon)."""
    from fedsim.defenses.base import DEFENSES, Defense

    class RoundCounter(Defense):
        stage = 30

        def wrap_training(self, job):
            seen = int(job.state.get("rounds", "0")) + 1
            job.state["rounds"] = str(seen)
            job.on_finish.append(lambda steps, sizes: {"rounds_seen": seen, "steps": steps})
            return job

    DEFENSES.add("round_counter_test", RoundCounter)
    try:
        tiny_raw["federation"]["rounds"] = 3
        tiny_raw["defenses"] = [{"name": "round_counter_test"}]
        outcome = run_federation(parse_scenario(tiny_raw))
    finally:
        DEFENSES._items.pop("round_counter_test")
    metrics = outcome.capture.client_metrics
    assert sorted(metrics) == [1, 2, 3]
    assert all(metrics[r][p] == {"rounds_seen": r, "steps": 1} for r in (1, 2, 3) for p in range(4))


def test_defenses_compose_by_stage_then_scenario_order(tiny_raw) -> None:
    from fedsim.defenses import build_defenses

    tiny_raw["defenses"] = [
        {"name": "gaussian_noise", "params": {"sigma": 0.01}},  # stage 50: the update
        {"name": "clipping", "params": {"max_norm": 1.0}},      # stage 50: after the noise (scenario order)
        {"name": "dropout", "params": {"p": 0.1}},              # stage 10: the model, first
    ]
    names = [d.name for d in build_defenses(parse_scenario(tiny_raw))]
    assert names == ["dropout", "gaussian_noise", "clipping"]
