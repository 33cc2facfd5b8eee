"""What an attack sees is exactly what its knowledge grants, and the runner, not the attack, says what is oracle.

Every value below is chosen so that it cannot appear in a view by accident (sigma 0.7331, clipping
norm 2.345, ...); the view is scanned field by field, through every mapping and tuple, for each of
them: absent when the knowledge flag that grants it is off, present when it is on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

import fedsim.attacks as attacks
from fedsim.attacking import observe, run_attacks
from fedsim.attacks.base import Attack, AttackParams
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.attacks.victim import rebuild_model
from fedsim.metrics import score_reconstruction
from fedsim.metrics.image import mse_per_image, psnr_per_image
from fedsim.report.summary import summary_markdown
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import GroundTruth, Reconstruction, ReleasedModel, ServerModel

SIGMA, CLIP, BETA, MAX_NORM, LR, WEIGHT_DECAY = 0.7331, 2.345, 0.0271, 3.217, 0.0437, 0.00123
DEFENSE_VALUES = (SIGMA, CLIP, BETA, MAX_NORM)
HPARAM_VALUES = (LR, WEIGHT_DECAY)


def _scan(obj: Any, scalars: list[float], tensors: list[Tensor], strings: list[str]) -> None:
    """Every scalar, tensor and string reachable from ``obj`` (dataclass fields, mappings, sequences)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _scan(getattr(obj, f.name), scalars, tensors, strings)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _scan(key, scalars, tensors, strings)
            _scan(value, scalars, tensors, strings)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            _scan(item, scalars, tensors, strings)
    elif isinstance(obj, Tensor):
        tensors.append(obj)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, int | float):
        scalars.append(float(obj))
    elif isinstance(obj, str):
        strings.append(obj)


def _contents(view: Any) -> tuple[list[float], list[Tensor], list[str]]:
    scalars: list[float] = []
    tensors: list[Tensor] = []
    strings: list[str] = []
    _scan(view, scalars, tensors, strings)
    return scalars, tensors, strings


def _has_scalar(scalars: list[float], value: float) -> bool:
    return any(math.isclose(s, value, rel_tol=1e-9) for s in scalars)


def _has_tensor(tensors: list[Tensor], value: Tensor) -> bool:
    return any(t.shape == value.shape and bool((t.double() == value.double()).all()) for t in tensors)


@pytest.fixture(scope="module")
def federation(request) -> tuple[Any, Any, Any]:
    """One fedsgd round of a dropout MLP under DP-SGD (sigma, C), MID (beta) and update clipping."""
    from tests.conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["federation"].update(rounds=1, local={"batch_size": 4, "lr": LR, "weight_decay": WEIGHT_DECAY})
    raw["model"] = {"name": "mlp", "width": 2, "dropout": 0.25}
    raw["defenses"] = [
        {"name": "dp_sgd", "params": {"noise_multiplier": SIGMA, "max_grad_norm": CLIP}},
        {"name": "mid", "params": {"beta": BETA, "bottleneck_dim": 3}},
        {"name": "clipping", "params": {"max_norm": MAX_NORM}},
    ]
    raw["attacks"][0]["rounds"] = [1]
    scenario = parse_scenario(raw)
    outcome = run_federation(scenario)
    (cap,) = outcome.capture.updates
    return raw, scenario, cap


def _view(raw: dict, cap: Any, **knowledge: Any) -> Any:
    raw = copy.deepcopy(raw)
    raw["attacks"][0]["knowledge"] = knowledge
    scenario = parse_scenario(raw)
    setup = setup_for(scenario)
    descriptions = [dict(d.public_description()) for d in setup.defenses]
    return observe(cap, setup.task, scenario, scenario.attacks[0], descriptions)


def test_no_defense_parameter_reaches_an_attack_without_knowledge_defense(federation) -> None:
    """The model-rebuild metadata (TaskInfo.model_transforms) used to carry DP-SGD's sigma and clipping
    norm and MID's beta to every attack; now only what rebuilds the architecture travels there."""
    raw, scenario, cap = federation
    scalars, _, strings = _contents(_view(raw, cap))
    for value in DEFENSE_VALUES:
        assert not _has_scalar(scalars, value), f"{value} reached an attack without knowledge.defense"
    # DP-SGD did not change this model (no BatchNorm to replace), so not even its name is told
    assert "dp_sgd" not in strings and "clipping" not in strings
    told, _, told_strings = _contents(_view(raw, cap, defense=True))
    assert all(_has_scalar(told, value) for value in DEFENSE_VALUES)
    assert {"dp_sgd", "mid", "clipping"} <= set(told_strings)


def test_released_model_carries_no_defense_parameter(federation) -> None:
    raw, scenario, cap = federation
    setup = setup_for(scenario)
    scalars, _, strings = _contents(ReleasedModel(1, setup.task, dict(cap.global_state)))
    assert not any(_has_scalar(scalars, v) for v in DEFENSE_VALUES) and "dp_sgd" not in strings


def test_local_hyperparameters_labels_and_masks_only_when_granted(federation) -> None:
    raw, scenario, cap = federation
    masks = [v for k, v in cap.truth.extras.items() if k.startswith("mask/")]
    assert masks, "the dropout model recorded no masks"
    scalars, tensors, _ = _contents(_view(raw, cap))
    assert not any(_has_scalar(scalars, v) for v in HPARAM_VALUES)
    assert not _has_tensor(tensors, cap.truth.labels)
    assert not any(_has_tensor(tensors, m) for m in masks)
    scalars, tensors, _ = _contents(_view(raw, cap, local_hparams=True, labels="known", oracle_masks=True))
    assert all(_has_scalar(scalars, v) for v in HPARAM_VALUES)
    assert _has_tensor(tensors, cap.truth.labels)
    assert all(_has_tensor(tensors, m) for m in masks)


def test_the_rebuilt_model_is_the_servers_model(federation) -> None:
    """Stripping defense parameters must not change the architecture the attacker rebuilds."""
    raw, scenario, cap = federation
    setup = setup_for(scenario)
    server = setup.build_model()
    rebuilt = rebuild_model(setup.task, server.state_dict())
    assert repr(rebuilt) == repr(server)


@pytest.mark.parametrize(("name", "params", "model"), [
    ("mid", {"beta": 0.5, "bottleneck_dim": 5}, {"name": "mlp", "width": 2}),
    ("dropout", {"p": 0.4}, {"name": "mlp", "width": 2}),
    ("dropout", {"p": 0.4}, {"name": "mlp", "width": 2, "dropout": 0.1}),
    ("dp_sgd", {"noise_multiplier": 1.0}, {"name": "mlp", "width": 2, "norm": "batch"}),
])
def test_every_model_transform_is_rebuilt_from_its_public_description(tiny_raw, name, params, model) -> None:
    tiny_raw["model"] = model
    tiny_raw["defenses"] = [{"name": name, "params": params}]
    setup = setup_for(parse_scenario(tiny_raw))
    server = setup.build_model()
    assert repr(rebuild_model(setup.task, server.state_dict())) == repr(server)


# -- the runner decides what is oracle ----------------------------------------------------------------

class _Echo(Attack):
    """Returns the granted labels and ``copies`` gray images per example (never claims anything)."""

    Params = AttackParams
    copies: ClassVar[int] = 1

    def reconstruct(self, update, progress=None):
        n = int(update.num_examples)
        images = torch.full((n * self.copies, *update.task.input_shape), 0.5)
        labels = update.side_info.get("labels")
        return Reconstruction(images, None if labels is None else torch.as_tensor(labels).repeat(self.copies))


class _Twice(_Echo):
    copies = 2


@pytest.fixture
def echo_attacks():
    attacks.ATTACKS.add("echo_test", _Echo)
    attacks.ATTACKS.add("twice_test", _Twice)
    yield
    attacks.ATTACKS._items.pop("echo_test")
    attacks.ATTACKS._items.pop("twice_test")


def test_attacks_cannot_claim_or_disclaim_oracle() -> None:
    assert "oracle" not in {f.name for f in dataclasses.fields(Reconstruction)}


def _outcomes(tiny_raw: dict, specs: list[dict]) -> list[Any]:
    tiny_raw["attacks"] = specs
    scenario = parse_scenario(tiny_raw)
    out = run_federation(scenario)
    setup = setup_for(scenario)
    return run_attacks(scenario, out.capture.updates, setup.task, torch.device("cpu"))


def test_runner_records_oracle_labels_and_masks(tiny_raw, echo_attacks) -> None:
    tiny_raw["model"] = {"name": "mlp", "width": 2, "dropout": 0.25}
    base = {"name": "echo_test", "rounds": [1], "clients": [1], "budget": {"iterations": 1}}
    plain, given, masks = _outcomes(tiny_raw, [
        base, {**base, "knowledge": {"labels": "known"}}, {**base, "knowledge": {"oracle_masks": True}},
    ])
    assert not plain.oracle and not plain.oracle_labels
    assert given.oracle_labels and not given.oracle
    # labels the runner handed over are not a leakage measurement: no label accuracy is reported
    assert "label_acc" not in given.metrics and given.to_json()["oracle_labels"] is True
    assert masks.oracle and masks.to_json()["oracle"] is True and "dropout masks" in masks.to_json()["oracle_reasons"]
    scenario = parse_scenario(tiny_raw)
    md = summary_markdown(scenario, [], [plain, given, masks], {}, {})
    rows = [line for line in md.splitlines() if line.startswith("| echo_test")]
    assert "given" in rows[1] and "(oracle)" in rows[2] and "(oracle)" not in rows[0]


def test_surplus_reconstructions_are_flagged_and_penalised() -> None:
    """Two reconstructions for one true image: the scorer picks the better one with the ground truth,
    so the outcome says so, and the surplus enters the mean as a blind guess (0.5 gray)."""
    truth_img = torch.rand((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    good, bad = truth_img.clone(), torch.zeros_like(truth_img)
    good[..., 0, 0] = 1 - good[..., 0, 0]  # not perfect, so PSNR stays finite
    truth = GroundTruth(1, 0, truth_img, torch.tensor([3]))
    out = score_reconstruction(Reconstruction(torch.cat([bad, good]), torch.tensor([3, 7])), truth, lpips=False)
    assert out["oracle_selection"] is True and out["surplus_images"] == 1
    best = float(psnr_per_image(good, truth_img)[0])
    blind = float(psnr_per_image(torch.full_like(truth_img, 0.5), truth_img)[0])
    assert out["psnr_mean_selected"] == pytest.approx(best)
    assert out["psnr_mean"] == pytest.approx((best + blind) / 2)
    assert out["mse_mean"] == pytest.approx(float((mse_per_image(good, truth_img)
                                                   + mse_per_image(torch.full_like(truth_img, 0.5), truth_img)) / 2))
    assert out["label_acc"] == pytest.approx(0.5)  # one right label among two guesses for one example
    exact = score_reconstruction(Reconstruction(good, torch.tensor([3])), truth, lpips=False)
    assert "oracle_selection" not in exact and exact["psnr_mean"] == pytest.approx(best)


def test_runner_marks_oracle_selection(tiny_raw, echo_attacks) -> None:
    base = {"rounds": [1], "clients": [1], "budget": {"iterations": 1}}
    once, twice = _outcomes(tiny_raw, [{"name": "echo_test", **base}, {"name": "twice_test", **base}])
    assert not once.oracle
    assert twice.oracle and twice.metrics["oracle_selection"] is True
    assert any("selection" in r for r in twice.to_json()["oracle_reasons"])


def test_surplus_from_the_declared_count_is_not_oracle() -> None:
    """Under DP-SGD a client declares its expected batch size; an attack that reconstructs exactly that
    many images against a smaller realised batch made an honest estimate: the scorer still pays for the
    surplus, but the runner does not label it oracle. Returning more than the declared count is."""
    from fedsim.attacking import judge

    metrics = {"oracle_selection": True, "num_reconstructed": 4, "batch_size": 3, "psnr_mean": 10.0}
    oracle, reasons, _, out = judge(dict(metrics), asked=4)
    assert not oracle and not reasons
    assert out["count_mismatch"] is True and "oracle_selection" not in out
    oracle, reasons, _, out = judge(dict(metrics), asked=3)
    assert oracle and any("selection" in r for r in reasons) and out["oracle_selection"] is True


class _Recorder(MaliciousAttack):
    """Records the ManipulationView the malicious server hands it, and sends the honest model unchanged."""

    views: ClassVar[list[Any]] = []

    @classmethod
    def threat_model_for(cls, params: Any, knowledge: Any) -> str:
        return "G" if knowledge.auxiliary_data else "F"

    def manipulate(self, view: Any) -> ServerModel:
        type(self).views.append(view)
        return ServerModel(dict(view.global_state))

    def reconstruct(self, update, progress=None) -> Reconstruction:  # noqa: ANN001
        return Reconstruction.failure("test attack: records its view only")


@pytest.mark.parametrize("knowledge", [{}, {"local_hparams": True}, {"local_hparams": True, "auxiliary_data": True}])
def test_the_malicious_servers_view_carries_only_what_its_knowledge_grants(tiny_raw, knowledge) -> None:
    """Through the real server path: surrogate data (the test split) and its labels only with auxiliary_data, the
    local hyperparameters only with local_hparams. Knowledge {} cannot pass validation (F needs training details),
    so that case changes the parsed scenario's knowledge, as a bug past validation would."""
    from fedsim.scenario import Knowledge

    attacks.ATTACKS.add("test_recorder", _Recorder)
    _Recorder.views.clear()
    try:
        raw = copy.deepcopy(tiny_raw)
        raw["server"] = {"role": "malicious"}
        raw["federation"].update(rounds=1, local={"batch_size": 4, "lr": LR, "weight_decay": WEIGHT_DECAY})
        raw["attacks"] = [{"name": "test_recorder", "rounds": [1], "clients": [1],
                           "knowledge": {"local_hparams": True, **knowledge}}]
        scenario = parse_scenario(raw)
        if not knowledge:
            spec = scenario.attacks[0].model_copy(update={"knowledge": Knowledge()})
            scenario = scenario.model_copy(update={"attacks": [spec]})
        run_federation(scenario)
    finally:
        attacks.ATTACKS._items.pop("test_recorder", None)
    (view,) = _Recorder.views
    data = setup_for(scenario).data
    scalars, tensors, _ = _contents(view)
    surrogate = bool(knowledge.get("auxiliary_data"))
    assert (view.auxiliary is not None, view.auxiliary_labels is not None) == (surrogate, surrogate)
    assert _has_tensor(tensors, data.test_x) == surrogate and _has_tensor(tensors, data.test_y) == surrogate
    if surrogate:
        assert torch.equal(view.auxiliary, data.test_x) and torch.equal(view.auxiliary_labels, data.test_y)
    hparams = bool(knowledge.get("local_hparams"))
    assert (dict(view.hyperparams) != {}) == hparams
    assert _has_scalar(scalars, LR) == hparams and _has_scalar(scalars, WEIGHT_DECAY) == hparams
    if hparams:
        assert view.hyperparams["lr"] == LR and view.hyperparams["protocol"] == "fedsgd"
