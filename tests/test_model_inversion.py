"""Model inversion of the released global model (GMI, IF-GMI), its orchestration and its evaluation.

The federations here are small (mnist-5k, 1000 client examples, 2 clients, 2 rounds: ~88 % test
accuracy in a few seconds); the attacks use the shipped ``mnist-dcgan`` prior. The mnist-5k
evaluation classifier is trained once per machine and cached in ``~/.fedsim/cache/evaluators``
(~20-60 s the first time); the caching test uses its own directory and the small ``digits`` set.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import pytest
import torch

import fedsim.attacks as attacks
from fedsim.attacking import RELEASED_MODEL_ID
from fedsim.attacks.base import Attack, ModelInversionAttack
from fedsim.attacks.model_inversion import _Inversion, averaged_logits, is_stochastic, poincare_loss, released_network
from fedsim.data import load_dataset
from fedsim.errors import ScenarioError
from fedsim.metrics import evaluator as evaluator_mod
from fedsim.metrics.evaluator import load_evaluator
from fedsim.metrics.model_inversion import score_model_inversion
from fedsim.run import run_scenario
from fedsim.scenario import DataSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import Reconstruction, ReleasedModel

FAST: dict[str, Any] = {
    "name": "mi-fast",
    "seed": 3,
    "device": "cpu",
    "data": {"dataset": "mnist-5k", "train_subset": 1000, "partition": {"kind": "iid"}},
    "model": {"name": "convnet", "width": 8},
    "federation": {"clients": 2, "rounds": 2, "protocol": "fedavg",
                   "local": {"batch_size": 32, "lr": 0.05, "epochs": 2, "momentum": 0.9}},
    "backend": {"kind": "inprocess"},
    "attacks": [{"name": "gmi", "params": {"samples_per_class": 2, "forward_passes": 2},
                 "budget": {"iterations": 60, "restarts": 1},
                 "knowledge": {"local_hparams": True, "auxiliary_data": True}}],  # SoK D
}


def fast(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(FAST)
    raw.update(changes)
    return raw


def with_mid(beta: float) -> dict[str, Any]:
    return fast(defenses=[{"name": "mid", "params": {"beta": beta, "bottleneck_dim": 16}}])


def trivial_mi_accuracy(labels: torch.Tensor) -> float:
    """The best MI accuracy a guess that never looked at the model gets from the same evaluator: uniform
    noise, a flat grey, a black image and the average mnist-5k training digit, one per target label."""
    from helpers import trivial_guesses

    evaluator = load_evaluator(DataSpec(dataset="mnist-5k"))
    data = load_dataset(DataSpec(dataset="mnist-5k", train_subset=1000))
    shape = (len(labels), *data.input_shape)
    guesses = [g for name, g in trivial_guesses(torch.zeros(shape)).items() if name in ("grey", "uniform noise")]
    guesses += [torch.zeros(shape), data.train_x.mean(dim=0, keepdim=True).expand(shape).clone()]
    return max(score_model_inversion(Reconstruction(g, labels), evaluator)["mi_accuracy"] for g in guesses)


# -- the contract ----------------------------------------------------------------------------------

def test_released_model_view_carries_no_ground_truth() -> None:
    assert {f.name for f in dataclasses.fields(ReleasedModel)} == {"round", "task", "state"}
    params = list(inspect.signature(ModelInversionAttack.invert).parameters)
    assert params == ["self", "model", "target_classes", "progress"]
    for name in ("gmi", "if_gmi"):
        cls = attacks.ATTACKS.get(name)
        assert issubclass(cls, ModelInversionAttack) and cls.target == "model"
        assert list(inspect.signature(cls.invert).parameters) == params
    assert Attack.target == "update" and attacks.ATTACKS.get("inverting_gradients").target == "update"


def test_clients_field_and_a_missing_prior_are_refused_at_validation() -> None:
    raw = fast()
    raw["attacks"][0]["clients"] = [0]
    with pytest.raises(ScenarioError, match=r"attacks\[0\].*released global model.*clients"):
        parse_scenario(raw)
    raw = fast()
    raw["attacks"][0]["params"]["prior"] = "no-such-prior"
    with pytest.raises(ScenarioError, match=r"attacks\[0\].*params.prior.*no-such-prior"):
        parse_scenario(raw)


def test_poincare_loss_falls_as_the_logits_approach_the_target() -> None:
    """IF-GMI's loss: the Poincare-ball distance of the L1-normalised logits to v = one-hot minus 1e-4
    (measured: 38.2, 9.90, 5.31, 0.69 for the four rows)."""
    labels = torch.zeros(4, dtype=torch.long)
    logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.99, 0.01, 0.0], [1 - 1e-4, 1e-4 / 2, 1e-4 / 2]])
    other, tie, near, at = poincare_loss(logits, labels).tolist()
    assert other > tie > near > at and at < 1.0


# -- orchestration ---------------------------------------------------------------------------------

def test_model_attack_runs_on_released_rounds_as_partition_minus_two() -> None:
    """Default: the final round only; no client update is captured for a model-only scenario; an explicit
    ``rounds`` also keeps that round's model, which the federation's history confirms is the released one."""
    scenario = parse_scenario(fast())
    outcome = run_federation(scenario)
    assert outcome.capture.updates == [] and set(outcome.released) == {2}
    assert all(torch.equal(outcome.released[2][k], outcome.final_state[k]) for k in outcome.final_state)
    raw = fast()
    raw["attacks"][0]["rounds"] = [1]
    raw["attacks"][0]["budget"]["iterations"] = 5
    result = run_scenario(parse_scenario(raw), write=False)
    (o,) = result.outcomes
    assert (o.attack, o.round, o.partition_id, o.failed) == ("gmi", 1, RELEASED_MODEL_ID, None)
    assert o.to_json()["client"] == -2 and o.reconstruction.shape == (20, 1, 28, 28)
    assert set(o.metrics) >= {"mi_accuracy", "mi_top5", "knn_distance", "target_confidence"}
    assert o.stats["evaluator_accuracy"] > 0.9 and o.stats["iterations"] == 5


def test_explicit_rounds_keep_those_models_too() -> None:
    raw = fast()
    raw["attacks"][0]["every"] = 1
    outcome = run_federation(parse_scenario(raw))
    assert set(outcome.released) == {1, 2}
    assert not all(torch.equal(outcome.released[1][k], outcome.released[2][k]) for k in outcome.final_state)


def test_secure_aggregation_server_keeps_the_released_model_too() -> None:
    raw = fast(defenses=[{"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}])
    raw["federation"]["clients"] = 3
    raw["attacks"][0]["budget"]["iterations"] = 2
    result = run_scenario(parse_scenario(raw), write=False)
    (o,) = result.outcomes
    assert o.failed is None and o.partition_id == RELEASED_MODEL_ID and "mi_accuracy" in o.metrics


@pytest.mark.slow
@pytest.mark.ray
def test_ray_and_inprocess_release_identical_models() -> None:
    """Measured ~90 s on the shared machine (Ray start-up), hence slow."""
    raw = fast()
    raw["attacks"][0]["every"] = 1
    scenario = parse_scenario(raw)
    local, ray = run_federation(scenario, backend="inprocess"), run_federation(scenario, backend="ray")
    assert set(local.released) == set(ray.released) == {1, 2}
    for r in (1, 2):
        assert all(torch.equal(local.released[r][k], ray.released[r][k]) for k in local.released[r])


# -- the evaluation classifier and the metrics -----------------------------------------------------

def test_evaluation_classifier_is_cached_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    first = load_evaluator(DataSpec(dataset="digits"))
    files = list((tmp_path / "evaluators").glob("*.pt"))
    assert first.trained_now and files == [first.path] and first.accuracy > 0.8  # measured 0.847 (72 held out)
    mtime = first.path.stat().st_mtime_ns

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached evaluation classifier was retrained")

    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})  # a new process: only the disk cache is left
    second = load_evaluator(DataSpec(dataset="digits", train_subset=100))  # clients' subset: same judge
    assert not second.trained_now and second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert second.accuracy == first.accuracy
    x = first.reference_x[:16]
    assert torch.equal(first.logits(x), second.logits(x))
    first.path.write_bytes(b"not a torch file")  # a corrupt cache file is retrained over, not trusted
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    with pytest.raises(AssertionError, match="retrained"):
        load_evaluator(DataSpec(dataset="digits"))


def test_metrics_on_real_images_of_the_class_vs_noise() -> None:
    """Real client-side (train split) mnist-5k digits of each class, which the evaluator never saw,
    score as a perfect inversion would; uniform noise scores near chance and far away in feature space."""
    evaluator = load_evaluator(DataSpec(dataset="mnist-5k"))
    data = load_dataset(DataSpec(dataset="mnist-5k", train_subset=2000))
    picks = torch.cat([(data.train_y == c).nonzero().flatten()[:3] for c in range(10)])
    labels = data.train_y[picks]
    real = score_model_inversion(Reconstruction(data.train_x[picks], labels), evaluator)
    noise = score_model_inversion(
        Reconstruction(torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(0)), labels), evaluator)
    assert real["mi_accuracy"] >= 0.9 and real["mi_top5"] == 1.0
    assert noise["mi_accuracy"] <= 0.3
    assert real["knn_distance"] < 0.5 * noise["knn_distance"]
    assert score_model_inversion(Reconstruction.failure("boom"), evaluator) == {"failed": "boom"}
    bad = score_model_inversion(Reconstruction(torch.rand(2, 1, 8, 8), torch.tensor([0, 1])), evaluator)
    assert "shape" in bad["failed"]


# -- the attacks -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_result():
    return run_scenario(parse_scenario(fast()), write=False)


def test_gmi_inverts_every_class_well_above_chance(plain_result) -> None:
    """Measured (seed 3): global model 0.887 test accuracy; GMI (60 steps) mi_accuracy 0.65, top-5 0.95."""
    (o,) = plain_result.outcomes
    assert plain_result.history[-1]["test_accuracy"] > 0.8
    assert o.failed is None and o.metrics["classes"] == list(range(10))
    assert o.metrics["mi_accuracy"] >= trivial_mi_accuracy(o.labels) + 0.3  # measured 0.65 vs 0.1-0.2
    assert o.metrics["target_confidence"] > 0.8
    assert o.stats["stochastic_model"] == 0.0 and o.stats["forward_passes"] == 1.0


def test_gmi_is_reproducible_and_refuses_unknown_classes() -> None:
    scenario = parse_scenario(fast())
    outcome = run_federation(scenario)
    model = ReleasedModel(2, setup_for(scenario).task, outcome.released[2])
    attack = attacks.ATTACKS.get("gmi").from_spec(scenario.attacks[0].model_copy(
        update={"budget": scenario.attacks[0].budget.model_copy(update={"iterations": 20, "restarts": 3})}),
        torch.device("cpu"), 11)
    a, b = attack.invert(model, [2, 7]), attack.invert(model, [2, 7])
    assert torch.equal(a.images, b.images) and a.labels.tolist() == [2, 2, 7, 7]
    assert a.stats["candidates"] == 3.0 and a.images.min() >= 0 and a.images.max() <= 1
    assert "outside" in attack.invert(model, [10]).failed


def test_candidates_are_chosen_per_image_by_the_lowest_target_loss() -> None:
    """Over (stage, restart), per target image; a NaN loss never wins."""
    inv = object.__new__(_Inversion)
    inv.targets, inv.restarts = torch.tensor([3, 5]), 2
    # candidate i of stage s (restart-major: restart 0 -> targets 0, 1; restart 1 -> targets 0, 1) has value 10 s + i
    images = [torch.full((4, 1, 1, 1), 0.0) + torch.arange(4.0).view(4, 1, 1, 1) + 10 * s for s in range(2)]
    losses = [torch.tensor([0.5, float("nan"), 0.2, 0.9]), torch.tensor([0.3, 0.8, 0.4, 0.1])]
    chosen, loss, stage = inv.pick(images, losses)
    assert chosen.flatten().tolist() == [2.0, 13.0]  # target 0: stage 0 restart 1; target 1: stage 1 restart 1
    assert loss.tolist() == pytest.approx([0.2, 0.1]) and stage.tolist() == [0, 1]


def test_if_gmi_runs_its_stages_on_a_stochastic_mid_model() -> None:
    raw = with_mid(0.0)
    raw["attacks"] = [{"name": "if_gmi", "params": {"samples_per_class": 1, "target_classes": [1, 4],
                                                    "forward_passes": 2, "initial_pool": 32},
                       "budget": {"iterations": 20, "restarts": 1},
                       "knowledge": {"local_hparams": True, "auxiliary_data": True}}]
    scenario = parse_scenario(raw)
    (o,) = run_scenario(scenario, write=False).outcomes
    assert o.failed is None and o.stats["stages"] == 3.0 and o.stats["iterations"] == 20 + 2 * 4
    assert o.stats["stochastic_model"] == 1.0 and o.stats["forward_passes"] == 2.0
    assert o.reconstruction.shape == (2, 1, 28, 28) and o.metrics["classes"] == [1, 4]


def test_released_mid_model_is_rebuilt_and_recognised_as_stochastic() -> None:
    scenario = parse_scenario(with_mid(0.0))
    state = run_federation(scenario).released[2]
    net = released_network(ReleasedModel(2, setup_for(scenario).task, state))
    assert is_stochastic(net, (1, 28, 28), "cpu")
    x = torch.rand(3, 1, 28, 28)
    assert averaged_logits(net, x, 8).shape == (3, 10)


def test_model_inversion_accuracy_drops_as_mid_beta_rises(plain_result) -> None:
    """MID (Wang et al. 2021) on the same federation, beta 0 vs 0.1 (bottleneck 16), fixed seed.

    Measured: beta 0: test accuracy 0.877, GMI mi_accuracy 0.75; beta 0.1: the KL term wins, the
    bottleneck carries nothing (test accuracy 0.10) and GMI's images are at chance (0.10). In this
    setting the drop comes with the utility collapse (beta 0.01: 0.841 accuracy, 0.75 mi_accuracy).
    """
    low, high = (run_scenario(parse_scenario(with_mid(b)), write=False) for b in (0.0, 0.1))
    (lo,), (hi,) = low.outcomes, high.outcomes
    assert lo.failed is None and hi.failed is None
    blind = trivial_mi_accuracy(lo.labels)
    assert lo.metrics["mi_accuracy"] >= blind + 0.3 and hi.metrics["mi_accuracy"] <= blind + 0.1
    assert hi.metrics["knn_distance"] > lo.metrics["knn_distance"]
    assert low.history[-1]["test_accuracy"] > 0.8 > high.history[-1]["test_accuracy"]


@pytest.mark.slow
def test_shipped_scenario_gmi_and_if_gmi_leak_the_classes() -> None:
    """The shipped scenario end to end (~2-3 min): both attacks well above chance on a 94 % model."""
    from fedsim.scenario import load_scenario

    result = run_scenario(load_scenario("scenarios/attacks/model_inversion.yaml"), write=False)
    assert result.history[-1]["test_accuracy"] > 0.9
    gmi, if_gmi = result.outcomes
    blind = trivial_mi_accuracy(gmi.labels)
    assert gmi.metrics["mi_accuracy"] >= blind + 0.6 and if_gmi.metrics["mi_accuracy"] >= blind + 0.3


def test_an_unwritable_evaluator_cache_warns_and_keeps_the_classifier_in_memory(tmp_path, monkeypatch) -> None:
    """FEDSIM_CACHE_DIR naming a file (or a read-only home, a full disk) must not lose a finished run."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(blocker))
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    with pytest.warns(UserWarning, match="not cached"):
        first = load_evaluator(DataSpec(dataset="digits"))
    assert first.trained_now and not first.path.exists() and first.accuracy > 0.8

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("retrained within the same process")

    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    again = load_evaluator(DataSpec(dataset="digits"))  # from memory (a private copy of it), not retrained
    x = first.reference_x[:8]
    assert again.accuracy == first.accuracy and torch.equal(again.logits(x), first.logits(x))


def test_poincare_loss_matches_the_closed_form() -> None:
    """arccosh(1 + 2|u-v|^2 / ((1-|u|^2)(1-|v|^2))) with u = logits / |logits|_1, v = one-hot - 1e-4."""
    logits, label = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
    u = torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64)
    v = torch.tensor([1 - 1e-4, 0.0, 0.0], dtype=torch.float64)
    expected = torch.arccosh(1 + 2 * (u - v).pow(2).sum() / ((1 - u.pow(2).sum()) * (1 - v.pow(2).sum())))
    # float32: 1 - |v|^2 = 2e-4 cancels about four digits
    assert poincare_loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-4)


def test_model_inversion_over_rounds_is_a_leakage_curve_and_plot(tmp_path) -> None:
    """``every: 1`` on a model attack: MI accuracy per released round goes into metrics.json's leakage
    curve and, with no update attack to plot, onto the leakage-over-rounds figure."""
    from fedsim.attacking import AttackOutcome
    from fedsim.report.leakage import leakage_curve, leakage_plot

    outcomes = [AttackOutcome("gmi", 0, rnd, RELEASED_MODEL_ID, {"mi_accuracy": acc, "knn_distance": 7.0 - rnd},
                              {}, 1.0) for rnd, acc in ((1, 0.7), (2, 1.0))]
    curve = leakage_curve(outcomes)
    assert [(r["round"], r["mi_accuracy"], r["knn_distance"]) for r in curve] == [(1, 0.7, 6.0), (2, 1.0, 5.0)]
    history = [{"round": r, "test_accuracy": a, "test_loss": 1.0} for r, a in ((0, 0.1), (1, 0.7), (2, 0.9))]
    assert leakage_plot(curve, history, tmp_path / "rounds.png") and (tmp_path / "rounds.png").stat().st_size > 0
    assert not leakage_plot(curve[:1], history, tmp_path / "one.png")  # one round is no curve
