"""Validation of the malicious-server attacks names the field to edit (QA findings 9, 10, 11 of issue 14).

Kinds guarded: (a) an analytic attack that reads a FedAvg update as a sum of SGD gradients is refused when local
training breaks that (Adam, weight decay) at the ``federation.local`` field; (b) two fields of which one would
silently win are refused (``rounds`` with ``every``, ``epochs`` with ``steps``, Adam with momentum,
``to_all: false`` under SecAgg+), and an overlap error names the field the user set; (c) a plug-in's refusal about
the model, the dataset or the protocol points at ``model.name`` / ``data.dataset`` / ``federation.protocol``, and
messages write YAML's ``true``/``false``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios" / "attacks"


def _raw(name: str) -> dict:
    raw = yaml.safe_load((SCENARIOS / name).read_text())
    raw["backend"] = {"kind": "inprocess"}
    return raw


def _refused(raw: dict) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    return info.value


def _fedavg(raw: dict, **local) -> dict:
    raw = copy.deepcopy(raw)
    raw["federation"]["protocol"] = "fedavg"
    raw["federation"]["local"] = {**raw["federation"].get("local", {}), "steps": 2, **local}
    raw["federation"]["local"].pop("epochs", None)
    return raw


@pytest.mark.parametrize(("local", "path"), [({"optimizer": "adam"}, "federation.local.optimizer"),
                                             ({"weight_decay": 0.01}, "federation.local.weight_decay")])
def test_robbing_the_fed_refuses_local_training_that_is_not_a_sum_of_gradients(local, path) -> None:
    err = _refused(_fedavg(_raw("robbing_the_fed.yaml"), **local))
    assert err.path == path and "sum of SGD gradients" in err.reason


def test_robbing_the_fed_accepts_momentum_and_plain_fedavg_sgd() -> None:
    parse_scenario(_fedavg(_raw("robbing_the_fed.yaml")))
    parse_scenario(_fedavg(_raw("robbing_the_fed.yaml"), momentum=0.9))  # a positive sum keeps the bin ratio


def test_rescaling_a_fedavg_delta_refuses_momentum() -> None:
    """A scale-sensitive distance divides the delta by lr * steps: plain SGD only."""
    raw = _fedavg(_raw("robbing_the_fed.yaml"), momentum=0.9)
    raw["server"] = {"role": "honest_but_curious"}
    raw["attacks"] = [{"name": "dlg", "params": {"distance": "l2"}, "budget": {"iterations": 1},
                       "knowledge": {"local_hparams": True}}]
    assert _refused(raw).path == "federation.local.momentum"


def test_rounds_and_every_together_are_refused_at_every() -> None:
    raw = _raw("robbing_the_fed.yaml")
    raw["federation"]["rounds"] = 3
    raw["attacks"][0].update(rounds=[2], every=1)
    err = _refused(raw)
    assert err.path == "attacks[0].every" and "not both" in err.reason
    del raw["attacks"][0]["rounds"]
    scenario = parse_scenario(raw)
    parse_scenario(scenario.model_dump(mode="json"))  # a run folder's scenario.yaml (every field written) reloads


@pytest.mark.parametrize(("local", "path"), [({"epochs": 2, "steps": 2}, "federation.local.steps"),
                                             ({"optimizer": "adam", "momentum": 0.9}, "federation.local.momentum")])
def test_local_fields_one_of_which_would_win_are_refused(local, path) -> None:
    raw = _raw("robbing_the_fed.yaml")
    raw["federation"]["local"] = {**raw["federation"].get("local", {}), **local}
    assert _refused(raw).path == path
    raw["federation"]["local"].pop(path.rsplit(".", 1)[1])
    parse_scenario(parse_scenario(raw).model_dump(mode="json"))  # the dump of the valid one reloads


def test_overlapping_manipulated_rounds_name_the_field_the_user_set() -> None:
    raw = _raw("robbing_the_fed.yaml")
    raw["federation"]["rounds"] = 3
    second = copy.deepcopy(raw["attacks"][0])
    second.pop("rounds", None)
    second["every"] = 2
    raw["attacks"].append(second)
    err = _refused(raw)
    assert err.path == "attacks[1].every" and "round 1" in err.reason


def test_to_all_false_under_secagg_is_refused() -> None:
    raw = _raw("robbing_the_fed_secagg.yaml")
    raw["attacks"][0]["params"]["to_all"] = False
    assert _refused(raw).path == "attacks[0].params.to_all"


@pytest.mark.parametrize(("name", "model"), [("analytic_fc.yaml", "convnet"), ("trap_weights.yaml", "convnet")])
def test_model_refusals_point_at_model_name(name, model) -> None:
    raw = _raw(name)
    raw["model"] = {"name": model}
    assert _refused(raw).path == "model.name"


@pytest.mark.parametrize("name", ["analytic_fc.yaml", "trap_weights.yaml"])
def test_protocol_refusal_points_at_federation_protocol(name) -> None:
    err = _refused(_fedavg(_raw(name)))
    assert err.path == "federation.protocol" and "fedsgd" in err.reason


def test_threat_model_refusal_writes_yaml_booleans() -> None:
    raw = _raw("robbing_the_fed.yaml")
    raw["attacks"][0]["knowledge"]["auxiliary_data"] = False
    err = _refused(raw)
    assert "false" in err.reason and "False" not in err.reason, err


def _printed(capsys, metrics: dict, oracle_labels: bool = False) -> str:
    from types import SimpleNamespace

    from fedsim.cli import _print_result

    outcome = SimpleNamespace(attack="robbing_the_fed", oracle=False, round=1, partition_id=0, failed=None,
                              metrics=metrics, oracle_labels=oracle_labels, seconds=0.1, stats={})
    _print_result(SimpleNamespace(history=[], client_failures=[], outcomes=[outcome],
                                  timing={"federation_s": 0.0, "attacks_s": 0.0}, out_dir=None))
    return capsys.readouterr().out


def test_stdout_says_nothing_about_labels_an_attack_did_not_return(capsys) -> None:
    """Finding 14: an attack without labels printed 'label acc nan'."""
    line = _printed(capsys, {"psnr_mean": 80.0, "ssim_mean": 0.9})
    assert "nan" not in line and "label acc" not in line and "PSNR 80.00 dB" in line
    assert "label acc 0.50" in _printed(capsys, {"psnr_mean": 20.0, "ssim_mean": 0.5, "label_acc": 0.5})
    assert "labels given" in _printed(capsys, {"psnr_mean": 20.0, "ssim_mean": 0.5}, oracle_labels=True)


@pytest.mark.parametrize(("bins", "refused"), [(1024, True), (256, False)])
def test_imprint_bins_times_input_size_is_bounded_with_the_estimate(bins, refused) -> None:
    """Finding 15: bins x d float32 matrices on 224x224 colour images (d = 150528): 1024 bins are about
    16 copies x 4 bytes x 1024 x 150528 = 9.2 GiB per client, above the 8 GiB bound; 256 bins (2.3 GiB) pass."""
    from types import SimpleNamespace

    from fedsim.attacks.robbing_the_fed import RobbingTheFed

    scenario = parse_scenario(_raw("robbing_the_fed.yaml"))
    spec = scenario.attacks[0].model_copy(update={"params": {**scenario.attacks[0].params, "bins": bins}})
    facts = SimpleNamespace(task=SimpleNamespace(input_shape=(3, 224, 224)), model=None, examples={0: 64})
    estimate = 16 * 4 * bins * 3 * 224 * 224 / 2**30
    if not refused:
        RobbingTheFed.check_model(scenario, spec, facts)
        return
    with pytest.raises(ScenarioError) as info:
        RobbingTheFed.check_model(scenario, spec, facts)
    assert info.value.path == "params.bins" and f"{estimate:.1f} GiB" in info.value.reason


def test_leakage_curve_carries_the_share_above_40db_and_docs_name_the_cap() -> None:
    """Finding 12: metrics.json's per-round leakage had psnr_mean (set by the 100 dB cap for exact attacks) but not
    the share above 40 dB that the per-attack entries have; both readers must say exact images count as 100 dB."""
    from types import SimpleNamespace

    from fedsim.report.leakage import leakage_curve
    from fedsim.report.sections import HOW_TO_READ

    outcomes = [SimpleNamespace(attack="robbing_the_fed", attack_index=0, round=1, failed=None,
                                metrics={"psnr_mean": 100.0 * f + 6.0 * (1 - f), "frac_psnr_above_40db": f})
                for f in (0.75, 0.25)]
    (row,) = leakage_curve(outcomes)
    assert row["frac_psnr_above_40db"] == pytest.approx(0.5)
    assert "100 dB" in HOW_TO_READ and "headline" in HOW_TO_READ
    assert "100 dB" in (Path(__file__).resolve().parents[1] / "fedsim" / "report" / "summary.py").read_text()


def test_fedsim_list_at_80_columns_cuts_no_name() -> None:
    """Finding 16: at 80 columns the threat-model and field columns were cut with an ellipsis ('knowledge.loca…')."""
    from typer.testing import CliRunner

    from fedsim.cli import app

    out = CliRunner().invoke(app, ["list"], env={"COLUMNS": "80"}).output
    assert "…" not in out and "G Data-Enhanced Manipulator" in out
    row = next(line for line in out.splitlines() if "│ robbing_the_fed " in line)
    assert "│ G " in row


def test_accuracy_cost_on_a_tiny_test_split_says_n() -> None:
    """Finding 13: cifar10-mini's 4 held-out images made the cost 0.500 -> 0.000 with no hint of the denominator."""
    from fedsim.report.manipulation import manipulation_markdown, manipulation_section

    row = {"round": 1.0, "manipulated_clients": 1.0, "honest_test_accuracy": 0.5, "sent_test_accuracy": 0.0,
           "sent_accuracy_drop": 0.5, "sent_test_examples": 4.0}
    assert "n = 4 test images" in "\n".join(manipulation_markdown([row]))
    assert "n = 4 test images" in manipulation_section([row])
    assert "test images" not in "\n".join(manipulation_markdown([{**row, "sent_test_examples": 1000.0}]))


def test_server_lr_under_fedavg_is_refused_not_ignored() -> None:
    raw = _fedavg(_raw("robbing_the_fed.yaml"))
    raw["federation"]["server_lr"] = 0.5
    assert _refused(raw).path == "federation.server_lr"
