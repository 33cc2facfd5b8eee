"""Attack options whose precondition the declared model or protocol does not meet are refused at validation.

The precondition is read off the BUILT model (what feeds its final linear layer, whether it has
BatchNorm), never off the model's name: a ReLU MLP behind MID's bottleneck feeds the classifier a
Gaussian sample, which is negative half the time, and DP-SGD turns BatchNorm into GroupNorm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedsim.attacks as attacks
from fedsim.attacks.label_recovery import recover_labels
from fedsim.attacks.victim import attacker_mode
from fedsim.errors import ScenarioError
from fedsim.metrics import label_accuracy
from fedsim.models import MaskDropout
from fedsim.scenario import parse_scenario
from fedsim.threat import ClientUpdate, TaskInfo


def _refused(raw: dict, path: str, *words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert info.value.path == path, info.value
    for word in words:
        assert word in info.value.reason, info.value.reason


def _with(raw: dict, model: dict | None = None, params: dict | None = None, **attack) -> dict:
    if model is not None:
        raw["model"] = model
    if params is not None:
        raw["attacks"][0]["params"] = params
    raw["attacks"][0].update(attack)
    return raw


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("strategy", ["idlg", "yin"])
def test_sign_rules_refused_when_the_classifier_input_can_be_negative(tiny_raw, activation, strategy) -> None:
    raw = _with(tiny_raw, {"name": "mlp", "width": 2, "activation": activation}, {"label_strategy": strategy})
    _refused(raw, "attacks[0].params.label_strategy", strategy, type(_act(activation)).__name__)


def _act(name: str) -> nn.Module:
    return {"tanh": nn.Tanh(), "gelu": nn.GELU(), "relu": nn.ReLU(), "sigmoid": nn.Sigmoid()}[name]


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_sign_rules_accepted_on_non_negative_features(tiny_raw, activation) -> None:
    parse_scenario(_with(tiny_raw, {"name": "mlp", "width": 2, "activation": activation}, {"label_strategy": "idlg"}))


def test_bias_rules_and_known_labels_need_no_sign(tiny_raw) -> None:
    gelu = {"name": "mlp", "width": 2, "activation": "gelu"}
    parse_scenario(_with(tiny_raw, gelu, {"label_strategy": "auto"}))
    parse_scenario(_with(tiny_raw, gelu, {"label_strategy": "bias-corrected"}))
    parse_scenario(_with(tiny_raw, gelu, {"label_strategy": "idlg"}, knowledge={"labels": "known"}))


def test_structure_not_name_decides(tiny_raw) -> None:
    """A ReLU MLP is fine for iDLG, the same MLP behind MID's bottleneck is not; ViT ends in LayerNorm."""
    raw = _with(tiny_raw, {"name": "mlp", "width": 2, "activation": "relu"}, {"label_strategy": "idlg"})
    raw["defenses"] = [{"name": "mid"}]
    _refused(raw, "attacks[0].params.label_strategy", "idlg")
    raw["defenses"] = [{"name": "dropout", "params": {"p": 0.3}}]  # dropout keeps the sign
    parse_scenario(raw)


def test_classifier_input_from_the_built_structure() -> None:
    from fedsim.attacks.label_recovery import classifier_input

    relu = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), MaskDropout(0.5), nn.Linear(6, 3))
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    norm = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 3, bias=False))
    facts = [classifier_input(m, (1, 2, 2)) for m in (relu, tanh, norm)]
    assert [f.nonnegative for f in facts] == [True, False, False]
    assert [f.feeding for f in facts] == ["ReLU", "Tanh", "LayerNorm"]
    assert [f.has_bias for f in facts] == [True, True, False]


def test_the_refused_rule_really_is_wrong_there() -> None:
    """Why the refusal: single examples through a tanh MLP, labels by iDLG's row-sum rule versus the
    true labels (an independent fact): about half wrong, where the bias rule gets all of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))
    task = TaskInfo("t", (1, 4, 4), 5, (0.0,), (1.0,), {}, "fedsgd")
    idlg_hits = auto_hits = 0
    for i in range(40):
        x, y = torch.randn(1, 1, 4, 4), torch.tensor([i % 5])
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        update = ClientUpdate(1, 0, task, dict(model.state_dict()), grads, 1)
        idlg_hits += int(label_accuracy(recover_labels(update, 1, "idlg"), y)["label_acc"])
        auto_hits += int(label_accuracy(recover_labels(update, 1, "auto", attacker_mode(model)), y)["label_acc"])
    assert auto_hits == 40 and idlg_hits <= 30


def test_distinct_label_rules_refused_when_the_batch_exceeds_the_classes(tiny_raw) -> None:
    """iDLG's and Yin's batch rules return distinct classes; 16 examples of 10 classes must repeat one."""
    tiny_raw["federation"]["local"]["batch_size"] = 16
    _refused(_with(tiny_raw, params={"label_strategy": "yin"}), "attacks[0].params.label_strategy", "16")


# -- GradInversion's BatchNorm prior ----------------------------------------------------------------

def _gradinversion(raw: dict, protocol: str = "fedavg", norm: str = "batch", rounds: list[int] | None = None) -> dict:
    raw["model"] = {"name": "mlp", "width": 2, "norm": norm}
    raw["federation"].update(protocol=protocol, rounds=3, local={"steps": 1, "batch_size": 4, "lr": 0.1})
    raw["attacks"][0].update(name="gradinversion", rounds=rounds or [2], knowledge={"bn_stats": "running",
                                                                            "local_hparams": True,
                                                                            "auxiliary_data": True})  # SoK E
    return raw


def test_bn_prior_accepted_where_the_running_statistics_carry_data(tiny_raw) -> None:
    parse_scenario(_gradinversion(tiny_raw))


def test_bn_prior_refused_without_batchnorm(tiny_raw) -> None:
    _refused(_gradinversion(tiny_raw, norm="none"), "attacks[0].knowledge.bn_stats", "BatchNorm")


def test_bn_prior_refused_when_dp_sgd_replaced_batchnorm(tiny_raw) -> None:
    raw = _gradinversion(tiny_raw)
    raw["defenses"] = [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}]
    _refused(raw, "attacks[0].knowledge.bn_stats", "BatchNorm")


def test_bn_prior_refused_under_fedsgd_and_in_round_one(tiny_raw) -> None:
    _refused(_gradinversion(tiny_raw, protocol="fedsgd"), "attacks[0].knowledge.bn_stats", "fedsgd")
    _refused(_gradinversion(tiny_raw, rounds=[1, 2]), "attacks[0].knowledge.bn_stats", "round 1")


@pytest.mark.parametrize("name", sorted(n for n, cls in attacks.ATTACKS.items() if cls.target == "update"))
def test_client_batch_statistics_are_refused_for_every_attack(tiny_raw, name) -> None:
    """No runner channel carries the client's batch statistics, so granting them would grant nothing."""
    cls = attacks.ATTACKS.get(name)
    if "image" not in cls.inputs:  # a text attack on images is refused for that first: give it text
        from text_support import tiny_text

        tiny_raw = tiny_text("gpt", attacks=tiny_raw["attacks"])
    tiny_raw["federation"]["protocol"] = cls.protocols[0]
    tiny_raw["attacks"][0].update(name=name, knowledge={**cls.needs, "bn_stats": "client"})
    _refused(tiny_raw, "attacks[0].knowledge.bn_stats", "client")


# -- defense-aware modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["inverting_gradients", "gifd"])
def test_defense_aware_mode_refused_when_no_defense_can_be_modelled(tiny_raw, name) -> None:
    if name == "gifd":
        tiny_raw["data"] = {"dataset": "mnist-5k", "train_subset": 2000}
        tiny_raw["model"] = {"name": "convnet", "width": 4}
    grants = {"local_hparams": True, "auxiliary_data": True} if name == "gifd" else {}  # gifd: SoK threat model D
    tiny_raw["attacks"][0].update(name=name, knowledge={"defense": True, **grants})
    _refused(tiny_raw, "attacks[0].knowledge.defense", "nothing")
    tiny_raw["defenses"] = [{"name": "gaussian_noise"}]  # pure noise: no deterministic part to model
    _refused(tiny_raw, "attacks[0].knowledge.defense", "gaussian_noise")
    tiny_raw["defenses"] = [{"name": "clipping"}]
    parse_scenario(tiny_raw)


def test_a_run_checks_what_validation_could_not(tiny_raw, monkeypatch) -> None:
    """Validation skips the model checks when the data is not on disk yet (it never downloads); the run
    makes them once the data is there, before the federation starts."""
    import fedsim.attack_checks as checks
    import fedsim.run as run

    real = checks.model_facts
    monkeypatch.setattr(checks, "model_facts", lambda scenario: None)  # as if the data were missing
    scenario = parse_scenario(_with(tiny_raw, {"name": "mlp", "width": 2, "activation": "tanh"},
                                    {"label_strategy": "idlg"}))
    monkeypatch.setattr(checks, "model_facts", real)
    monkeypatch.setattr(run, "run_federation", lambda *a, **k: pytest.fail("the federation ran"))
    with pytest.raises(ScenarioError, match="label_strategy"):
        run.run_scenario(scenario, write=False)
