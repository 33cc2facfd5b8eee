"""What ``fedsim validate`` accepts must run; what cannot run is refused at validation with the field path.

Kinds guarded here (each was accepted by validation and then failed inside the federation):

* a model that cannot train on one example (BatchNorm) and a batch of one: a FedAvg epoch's lone last
  example now joins the batch before it (the update equals a bare full-batch PyTorch step); a batch
  size of 1 or a client holding one example is refused at ``federation.local.batch_size`` /
  ``federation.clients`` / ``data.partition``;
* data that does not fit (``train_subset`` beyond the data, more clients than examples, shards that
  cannot be dealt): refused at validation, not when the first client builds its partition;
* defense x model and defense x defense faults: DP-SGD ``ew`` on a ViT and ``functorch`` on a model that
  cannot take one example are refused at ``defenses[i]``; DP-SGD ghost clipping + MID now runs and
  sends what the ``hooks`` mode sends; Soteria twice or with DP-SGD is refused;
* ``budget.iterations: 0`` refused for every registered attack at ``attacks[i].budget.iterations``.

Every refusal test also bypasses validation and shows the same scenario really fails to run, so a
refusal is never broader than the fault.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fedsim.scenario as scenario_mod
from fedsim.cli import app
from fedsim.data import normalize
from fedsim.errors import FedsimError, ScenarioError
from fedsim.models import build_model
from fedsim.plugins import attack_registry
from fedsim.run import run_scenario
from fedsim.scenario import LocalTraining, ModelSpec, parse_scenario
from fedsim.training import batch_schedule

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the")]

BN = {"name": "mlp", "width": 4, "norm": "batch"}


def tiny(**changes: Any) -> dict:
    raw: dict[str, Any] = {
        "name": "must-run", "seed": 5, "device": "cpu",
        "data": {"dataset": "digits", "train_subset": 16},
        "model": {"name": "mlp", "width": 4},
        "federation": {"clients": 4, "rounds": 1, "protocol": "fedavg", "local": {"batch_size": 3, "lr": 0.5}},
        "backend": {"kind": "inprocess"},
    }
    for key, value in changes.items():
        scenario_mod.set_dotted(raw, key, copy.deepcopy(value))
    return raw


def fails_without_validation(raw: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``raw`` with the data-aware validation switched off; return the failure it ends in."""
    import fedsim.preflight

    monkeypatch.setattr(fedsim.preflight, "check_runnable", lambda scenario: None)
    try:
        scenario = parse_scenario(raw)
    except ScenarioError as err:
        raise AssertionError(f"refused by the schema/plug-in checks already: {err}") from None
    try:
        result = run_scenario(scenario, write=False)
    except (FedsimError, RuntimeError, ValueError) as err:
        return str(err)
    failures = getattr(result, "client_failures", [])  # clients that failed while others went on
    assert failures, "the scenario ran cleanly without validation: the refusal is broader than the fault"
    return " | ".join(str(f.get("reason", f)) for f in failures)


# -- a batch of one on a model that cannot train on one example ----------------------------------------

@pytest.mark.parametrize(("n", "bs", "epochs", "sizes"), [
    (4, 3, 2, [4, 4]),          # the case: 3 + 1 -> one batch of 4 per epoch
    (7, 3, 1, [3, 4]),
    (8, 3, 1, [3, 3, 2]),       # no lone example: unchanged
    (5, 2, 1, [2, 3]),
])
def test_a_lone_last_example_joins_the_batch_before_it(n: int, bs: int, epochs: int, sizes: list[int]) -> None:
    local = LocalTraining(batch_size=bs, epochs=epochs)
    batches = batch_schedule(n, local, "fedavg", torch.Generator().manual_seed(0), min_batch=2)
    assert [len(b) for b in batches] == sizes
    per_epoch = len(sizes) // epochs
    for e in range(epochs):  # every example exactly once per epoch
        used = torch.cat(batches[e * per_epoch:(e + 1) * per_epoch]).sort().values
        assert used.tolist() == list(range(n))
    plain = batch_schedule(n, local, "fedavg", torch.Generator().manual_seed(0))
    assert [len(b) for b in plain] == [min(bs, n - s) for s in range(0, n, bs)] * epochs  # min_batch 1: as before


def test_steps_schedules_merge_the_lone_example_of_every_pass() -> None:
    local = LocalTraining(batch_size=3, steps=5)
    batches = batch_schedule(4, local, "fedavg", torch.Generator().manual_seed(1), min_batch=2)
    assert [len(b) for b in batches] == [4] * 5


@pytest.mark.parametrize(("spec", "shape", "one_example_fails"), [
    (ModelSpec(name="mlp", width=4, norm="batch"), (1, 8, 8), True),      # BatchNorm1d on (1, C)
    (ModelSpec(name="mlp", width=4, norm="group"), (1, 8, 8), False),
    (ModelSpec(name="mlp", width=4), (1, 8, 8), False),
    (ModelSpec(name="convnet", width=4, norm="batch"), (3, 32, 32), False),  # BatchNorm2d over H x W > 1
    (ModelSpec(name="resnet18", width=4, norm="group"), (1, 8, 8), True),  # one value per group at 1x1
])
def test_min_train_batch_agrees_with_a_real_training_step(spec, shape, one_example_fails) -> None:
    from fedsim.training import min_train_batch

    model = build_model(spec, shape, 10, seed=0)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    got = min_train_batch(model, shape)
    after_rng = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_rng, torch.rand(3)), "the probe drew from the global RNG"
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the reference: PyTorch itself, one SGD step on one example in train mode
    trial = build_model(spec, shape, 10, seed=0).train()
    try:
        F.cross_entropy(trial(torch.rand(1, *shape)), torch.tensor([3])).backward()
        failed = False
    except ValueError:
        failed = True
    assert failed == one_example_fails
    assert got == (2 if failed else 1)


def test_batchnorm_fedavg_with_a_lone_last_example_runs_as_a_full_batch_step() -> None:
    """The issue's input (FedAvg, batch 3 on 4-example clients, BatchNorm) validates, runs, and each
    epoch is one batch of all 4 examples: the client's weights equal a bare PyTorch full-batch step."""
    from fedsim.simulation.setup import setup_for
    from fedsim.training import TrainingJob, local_update

    raw = tiny(model=BN)
    scenario = parse_scenario(raw)
    result = run_scenario(scenario, write=False)
    assert math.isfinite(result.history[-1]["test_loss"])

    setup = setup_for(scenario)
    x, y = setup.client_data(0)
    assert len(x) == 4
    model = setup.build_model()
    reference = copy.deepcopy(model).train()
    got = local_update(TrainingJob(model), x, y, local=scenario.federation.local, protocol="fedavg",
                       mean=setup.task.mean, std=setup.task.std, seed=scenario.seed, round_num=1, partition_id=0,
                       device=torch.device("cpu"))
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    F.cross_entropy(reference(normalize(x, setup.task.mean, setup.task.std)), y).backward()
    opt.step()
    want = reference.state_dict()
    for key, value in got.update.items():
        assert torch.allclose(value.float(), want[key].float(), atol=1e-5), key
    assert got.num_examples == 4


@pytest.mark.parametrize(("changes", "path"), [
    ({"model": BN, "federation.local.batch_size": 1}, "federation.local.batch_size"),
    ({"model": BN, "federation.local.batch_size": 1, "federation.protocol": "fedsgd"}, "federation.local.batch_size"),
    ({"model": BN, "data.train_subset": 5}, "federation.clients"),  # iid: three clients hold one example
    ({"model": BN, "federation.protocol": "fedsgd", "data.train_subset": 5}, "federation.clients"),
    ({"model": BN, "data.train_subset": 40, "federation.clients": 10, "federation.local.batch_size": 2,
      "data.partition": {"kind": "dirichlet", "alpha": 0.3}}, "data.partition"),
])
def test_a_batch_of_one_on_batchnorm_is_refused_at_its_field(changes, path, monkeypatch) -> None:
    raw = tiny(**changes)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)
    assert "single example" in err.value.reason and "\n" not in str(err.value)
    assert "Expected more than 1 value per channel" in fails_without_validation(raw, monkeypatch)


@pytest.mark.parametrize(("changes", "path"), [
    ({"data.train_subset": 3}, "federation.clients"),                     # 4 clients, 3 examples
    ({"data.train_subset": 100000}, "data.train_subset"),
    ({"data.train_subset": 12, "federation.clients": 6,
      "data.partition": {"kind": "shards", "shards_per_client": 2}}, "data.partition"),
])
def test_data_that_does_not_fit_is_refused_at_validation(changes, path, monkeypatch) -> None:
    raw = tiny(**changes)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)
    fails_without_validation(raw, monkeypatch)


def test_missing_data_is_never_downloaded_by_validation(tmp_path: Path) -> None:
    from fedsim.preflight import skipped_note

    root = tmp_path / "data"
    raw = tiny(data={"dataset": "mnist", "root": str(root), "download": True}, model={"name": "mlp", "width": 4})
    scenario = parse_scenario(raw)
    note = skipped_note(scenario)
    assert note is not None and "mnist" in note.lower()
    assert not root.exists() or not any(root.rglob("*")), "validation touched the data folder"
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 0 and "skipped" in out.output and "ok" in out.output


# -- defense x model, defense x defense -------------------------------------------------------------------

@pytest.mark.parametrize(("model", "mode", "path"), [
    ({"name": "vit", "width": 4}, "ew", "defenses[0].params.grad_sample_mode"),  # cannot expand the class token
    ({"name": "resnet18", "width": 4, "norm": "batch"}, "functorch", "defenses[0]"),  # 1x1 GroupNorm: no mode can
])
def test_dp_sgd_modes_that_cannot_differentiate_the_model_are_refused(model, mode, path, monkeypatch) -> None:
    raw = tiny(model=model, defenses=[{"name": "dp_sgd", "params": {"noise_multiplier": 1.0,
                                                                     "grad_sample_mode": mode}}])
    raw["federation"]["protocol"] = "fedsgd"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path and "\n" not in str(err.value), str(err.value)
    fails_without_validation(raw, monkeypatch)


def _first_client_update(raw: dict) -> dict[str, torch.Tensor]:
    """Client 0's fedsgd update in round 1: the model, the defenses' training wrappers, local training."""
    from fedsim.simulation.setup import FederationSetup
    from fedsim.training import TrainingJob, local_update

    scenario = parse_scenario(raw)
    setup = FederationSetup(scenario)
    x, y = setup.client_data(0)
    job = TrainingJob(setup.build_model(), seed=scenario.seed, round=1, partition_id=0, num_examples=len(x))
    for defense in setup.defenses:
        job = defense.wrap_training(job)
    result = local_update(job, x, y, local=scenario.federation.local, protocol="fedsgd", mean=setup.task.mean,
                          std=setup.task.std, seed=scenario.seed, round_num=1, partition_id=0,
                          device=torch.device("cpu"))
    return result.update


def test_dp_sgd_ghost_clipping_with_mid_runs_and_sends_what_hooks_mode_sends() -> None:
    """Ghost clipping needs per-example losses; MID's loss (CE + beta KL, both per example) now gives them.
    The reference is Opacus's other per-sample path (hooks): same clipping, same seeded noise."""
    def raw(mode: str) -> dict:
        r = tiny(defenses=[{"name": "mid", "params": {"beta": 0.1}},
                           {"name": "dp_sgd", "params": {"noise_multiplier": 0.5, "max_grad_norm": 0.05,
                                                         "grad_sample_mode": mode}}])
        r["federation"].update(protocol="fedsgd", local={"batch_size": 4, "lr": 0.5})
        return r

    ghost, hooks = _first_client_update(raw("ghost")), _first_client_update(raw("hooks"))
    assert ghost.keys() == hooks.keys()
    for key in hooks:
        assert torch.allclose(ghost[key], hooks[key], atol=1e-5), key
    run_scenario(parse_scenario(raw("ghost")), write=False)


@pytest.mark.parametrize("defenses", [
    [{"name": "soteria"}, {"name": "soteria"}],
    # hooks: the mode whose per-sample hooks record soteria's extra backward passes and crash; under bk it would
    # run, and is refused for the other reason in the message (the mask is computed outside the accountant).
    [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "grad_sample_mode": "hooks"}}, {"name": "soteria"}],
])
def test_soteria_combinations_that_cannot_run_are_refused(defenses, monkeypatch) -> None:
    from fedsim.plugins import defense_registry

    raw = tiny(defenses=defenses)
    raw["federation"]["protocol"] = "fedsgd"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path.startswith("defenses[") and "soteria" in err.value.reason
    monkeypatch.setattr(defense_registry().get("soteria"), "check_scenario", classmethod(lambda cls, sc, spec: None))
    fails_without_validation(raw, monkeypatch)


# -- attack budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [n for n in attack_registry().names()
                                    if attack_registry().get(n).min_iterations > 0])
def test_zero_iterations_is_refused_for_every_attack(attack: str) -> None:
    """Every attack that optimizes (``min_iterations > 0``); analytic ones (trap weights, Robbing the Fed) run none."""
    raw = tiny(attacks=[{"name": attack, "budget": {"iterations": 0}}])
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "attacks[0].budget.iterations", str(err.value)


def test_the_fedavg_attacker_replays_the_merged_schedule() -> None:
    """The client's rule and the attacker's replay are one function (fedsim.training.epoch_bounds): on a
    BatchNorm victim whose client merged a lone example, fedavg_inversion replays the same steps."""
    from fedsim.attacks.matching import local_schedule
    from fedsim.attacks.unrolling import step_slices

    assert local_schedule({"batch_size": 3, "epochs": 2, "lr": 0.1}, 4, min_batch=2) == (2, 3)
    assert local_schedule({"batch_size": 3, "epochs": 2, "lr": 0.1}, 4) == (4, 3)
    assert step_slices(7, 3, 3, min_batch=2) == [slice(0, 3), slice(3, 7), slice(0, 3)]
    raw = tiny(model=BN, attacks=[{"name": "fedavg_inversion", "knowledge": {"local_hparams": True},
                                   "budget": {"iterations": 2}}])
    outcome = run_scenario(parse_scenario(raw), write=False).outcomes[0]
    assert outcome.failed is None, outcome.failed
    assert outcome.stats["local_steps"] == 1  # one full batch of 4, as the client trained
