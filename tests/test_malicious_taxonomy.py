"""The SoK threat-model taxonomy (Carletti et al., USENIX Security 2025) everywhere: the letters' capabilities
against the SoK's own table (written out here from the README of ``gparrella12/sok_gias_fl``, not read from
fedsim), validation refusing an attack whose letter the scenario does not grant (with the field path, exit 2 from
``fedsim validate``), every registered attack declaring a letter, and the letters in metrics.json, summary.md and
report.html (old metrics.json files without them still render)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from typer.testing import CliRunner

import fedsim.attacks as attacks
from fedsim.attacks.base import Attack
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.threat import ClientUpdate, ManipulationView, Reconstruction, ServerModel
from fedsim.threat_models import THREAT_MODELS, granted_capabilities, refusal, strongest_letter

# The SoK's "Threat Models" table, column by column (✔ = 1), and its real-world applicability in stars.
SOK_COLUMNS = ("Model Updates", "Basic Knowledge", "Training Details", "Surrogate Data", "Client Data Distribution",
               "Active Manipulation", "Client Selection")
SOK_TABLE = {
    "A": ("Eavesdropper", "1000000", 3),
    "B": ("Informed Eavesdropper", "1100000", 3),
    "C": ("Parameter-Aware Eavesdropper", "1110000", 3),
    "D": ("Data-Enhanced Eavesdropper", "1111000", 2),
    "E": ("Statistical-Informed Eavesdropper", "1111100", 2),
    "F": ("Active Manipulator", "1110010", 1),
    "G": ("Data-Enhanced Manipulator", "1111010", 1),
    "H": ("Active Client Manipulator", "1111011", 1),
}
# The SoK's letters for the papers fedsim implements (its "Gradient Inversion Attacks" table).
SOK_PAPER_LETTERS = {"dlg": "A", "idlg": "A", "inverting_gradients": "B", "gradinversion": "E",
                     "fedavg_inversion": "C", "gan_latent": "D", "gifd": "D"}


def _sok_caps(letter: str) -> set[str]:
    return {col.lower() for col, bit in zip(SOK_COLUMNS, SOK_TABLE[letter][1], strict=True) if bit == "1"}


@pytest.mark.parametrize("letter", sorted(SOK_TABLE))
def test_each_letter_holds_exactly_the_sok_tables_capabilities(letter) -> None:
    tm = THREAT_MODELS[letter]
    name, _, stars = SOK_TABLE[letter]
    assert (tm.name, set(tm.capabilities), tm.applicability) == (name, _sok_caps(letter), stars)
    assert tm.malicious == (letter in "FGH")
    assert set(THREAT_MODELS) == set(SOK_TABLE)


def _scenario(**knowledge: Any) -> Any:
    role = knowledge.pop("role", "honest_but_curious")
    raw = {"name": "t", "server": {"role": role}, "attacks": [{"name": "inverting_gradients", "knowledge": knowledge}]}
    from fedsim.scenario import Scenario

    return Scenario.model_validate(raw)  # no plug-in checks: only what the scenario grants


@pytest.mark.parametrize(("grants", "letter"), [
    ({}, "B"),  # fedsim's server built the model: basic knowledge always
    ({"local_hparams": True}, "C"),
    ({"auxiliary_data": True}, "B"),  # surrogate data without training details is no SoK letter above B
    ({"local_hparams": True, "auxiliary_data": True}, "D"),
    ({"local_hparams": True, "auxiliary_data": True, "bn_stats": "running"}, "E"),
    ({"role": "malicious"}, "B"),  # manipulation without training details: F needs C's too
    ({"role": "malicious", "local_hparams": True}, "F"),
    ({"role": "malicious", "local_hparams": True, "auxiliary_data": True}, "H"),  # malicious grants selection too
])
def test_strongest_letter_of_a_scenarios_grants(grants, letter) -> None:
    scenario = _scenario(**grants)
    caps = granted_capabilities(scenario, scenario.attacks[0])
    assert strongest_letter(caps).letter == letter
    # brute force over the SoK's own table: the largest letter whose every capability is granted
    fitting = [lt for lt in SOK_TABLE if _sok_caps(lt) <= set(caps)]
    assert len(_sok_caps(letter)) == max(len(_sok_caps(lt)) for lt in fitting)


def test_refusal_names_server_role_first_and_every_field_to_set() -> None:
    scenario = _scenario()
    path, reason = refusal(scenario, 3, scenario.attacks[0], "G")
    assert path == "server.role"
    for field in ("server.role: malicious", "attacks[3].knowledge.local_hparams: true",
                  "attacks[3].knowledge.auxiliary_data: true"):
        assert field in reason
    granted = _scenario(role="malicious", local_hparams=True, auxiliary_data=True)
    assert refusal(granted, 0, granted.attacks[0], "G") is None


# -- validation, through the real registry and CLI ----------------------------------------------------------------

class _ProbeMalicious(MaliciousAttack):
    """Test-only malicious attack: sends the honest model, reconstructs nothing."""

    threat_model: ClassVar[str] = "F"
    assumes = ("test only",)

    def manipulate(self, view: ManipulationView) -> ServerModel:
        return ServerModel(state=dict(view.global_state))

    def reconstruct(self, update: ClientUpdate, progress: Any = None) -> Reconstruction:
        return Reconstruction.failure("test only")


class _ProbeDataMalicious(_ProbeMalicious):
    threat_model: ClassVar[str] = "G"


@pytest.fixture
def probes(monkeypatch):
    """Register the two test-only malicious attacks for one test (the registry forgets them afterwards)."""
    for name, cls in (("probe_f", _ProbeMalicious), ("probe_g", _ProbeDataMalicious)):
        monkeypatch.setitem(attacks.ATTACKS._items, name, cls)
    yield


def _write(tmp_path: Path, tiny_raw: dict, **changes: Any) -> Path:
    raw = copy.deepcopy(tiny_raw)
    raw["attacks"][0].update(changes.pop("attack", {}))
    raw.update(changes)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _validate(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


def test_honest_server_refuses_a_malicious_attack_at_server_role(probes, tmp_path, tiny_raw) -> None:
    path = _write(tmp_path, tiny_raw, attack={"name": "probe_f", "knowledge": {"local_hparams": True}})
    code, out = _validate(path)
    assert code == 2 and "server.role" in out and "Traceback" not in out, out
    assert "F (Active Manipulator)" in out and "malicious" in out
    assert len(out.strip().splitlines()) == 1, out
    # even with nothing else granted, the malicious grant is named first
    code, out = _validate(_write(tmp_path, tiny_raw, attack={"name": "probe_g"}))
    assert code == 2 and out.startswith("error: server.role: "), out


def test_missing_auxiliary_data_refused_at_its_path(probes, tmp_path, tiny_raw) -> None:
    path = _write(tmp_path, tiny_raw, server={"role": "malicious"},
                  attack={"name": "probe_g", "knowledge": {"local_hparams": True}})
    code, out = _validate(path)
    assert code == 2 and "attacks[0].knowledge.auxiliary_data" in out, out
    with pytest.raises(ScenarioError) as err:
        parse_scenario(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert err.value.path == "attacks[0].knowledge.auxiliary_data"


def test_granted_malicious_attack_validates(probes, tmp_path, tiny_raw) -> None:
    path = _write(tmp_path, tiny_raw, server={"role": "malicious"},
                  attack={"name": "probe_g", "knowledge": {"local_hparams": True, "auxiliary_data": True}})
    code, out = _validate(path)
    assert code == 0, out


def _gan(tiny_raw: dict, name: str, **knowledge: Any) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"dataset": "mnist-5k", "train_subset": 2000}
    raw["model"] = {"name": "convnet", "width": 4}
    raw["attacks"] = [{"name": name, "params": {"prior": "mnist-dcgan"}, "budget": {"iterations": 1},
                       "knowledge": knowledge, **({"clients": [0]} if name in ("gan_latent", "gifd") else {})}]
    return raw


@pytest.mark.parametrize("name", ["gan_latent", "gifd", "gmi", "if_gmi"])
def test_gan_prior_attacks_need_auxiliary_data(tiny_raw, name) -> None:
    raw = _gan(tiny_raw, name, local_hparams=True)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "attacks[0].knowledge.auxiliary_data", err.value
    raw["attacks"][0]["knowledge"]["auxiliary_data"] = True
    assert parse_scenario(raw).attacks[0].knowledge.auxiliary_data


def test_gradinversion_is_e_only_with_its_bn_prior(tiny_raw) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["model"] = {"name": "mlp", "width": 2, "norm": "batch"}
    raw["federation"].update(protocol="fedavg", rounds=3, local={"steps": 1, "batch_size": 4, "lr": 0.1})
    raw["attacks"][0].update(name="gradinversion", rounds=[2], knowledge={"bn_stats": "running"})
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "attacks[0].knowledge.local_hparams" and "E (Statistical" in err.value.reason
    raw["attacks"][0]["params"] = {"bn": 0.0}  # the BN prior off: the statistics are not used, B suffices
    parse_scenario(raw)


# -- every attack declares a letter -------------------------------------------------------------------------------

def _registered() -> list[tuple[str, type[Attack]]]:
    return [(n, c) for n, c in attacks.ATTACKS.items() if not n.startswith("probe_")]


def test_every_registered_attack_declares_a_valid_letter_and_assumptions() -> None:
    from fedsim.scenario import Knowledge

    for name, cls in _registered():
        own = [k for k in cls.__mro__ if k not in (Attack, MaliciousAttack) and "threat_model" in vars(k)]
        assert own, f"{name} inherits the base's letter instead of declaring its SoK threat model"
        assert cls.threat_model in THREAT_MODELS, name
        assert cls.assumes and all(isinstance(a, str) and a for a in cls.assumes), name
        try:
            params = cls.Params.model_validate({})
        except ValueError:
            continue  # required params: the class letter is checked above
        for knowledge in (Knowledge(), Knowledge(local_hparams=True, auxiliary_data=True, bn_stats="running")):
            letter = cls.threat_model_for(params, knowledge)
            assert letter in THREAT_MODELS and THREAT_MODELS[letter].malicious == issubclass(cls, MaliciousAttack), \
                (name, letter)


def test_malicious_letters_are_exactly_the_malicious_attacks() -> None:
    for name, cls in _registered():
        assert THREAT_MODELS[cls.threat_model].malicious == issubclass(cls, MaliciousAttack), name


@pytest.mark.parametrize(("name", "letter"), sorted(SOK_PAPER_LETTERS.items()))
def test_paper_attacks_carry_the_soks_letter(name, letter) -> None:
    assert attacks.ATTACKS.get(name).threat_model == letter


def test_fedsim_list_shows_letters_and_the_table() -> None:
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│ gradinversion " in line)
    assert "│ E " in row and "E Statistical-Informed Eavesdropper" in result.output  # letter; name in the legend
    assert "Data-Enhanced Manipulator" in result.output and "server.role: malicious" in result.output
    defense = next(line for line in result.output.splitlines() if "│ dp_sgd " in line)
    assert "Eavesdropper" not in defense


# -- outputs ------------------------------------------------------------------------------------------------------

def test_letters_in_metrics_summary_and_report_and_old_files_still_render(tmp_path, tiny_raw) -> None:
    from fedsim.report.html import render_report
    from fedsim.report.metrics_check import check_metrics
    from fedsim.run import run_scenario

    tiny_raw["attacks"].append({"name": "dlg", "rounds": [1], "clients": [1], "budget": {"iterations": 2},
                                "params": {"distance": "cosine"}, "knowledge": {"local_hparams": True}})
    out = tmp_path / "run"
    run_scenario(parse_scenario(tiny_raw), out)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [o["threat_model"] for o in metrics["attacks"]] == ["B", "A"]
    assert metrics["threat_model"] == {"server_role": "honest_but_curious", "attacks": [
        {"attack": "inverting_gradients", "attack_index": 0, "needed": "B", "granted": "B"},
        {"attack": "dlg", "attack_index": 1, "needed": "A", "granted": "C"}]}
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| inverting_gradients [SoK B] |" in summary and "| dlg [SoK A] |" in summary
    assert "server `honest_but_curious`" in summary and "dlg needs A (Eavesdropper), granted C" in summary
    assert "inverting_gradients [SoK B]" in (out / "report.html").read_text(encoding="utf-8")
    # a metrics.json written before the taxonomy: no letters anywhere, and it still checks and renders
    for o in metrics["attacks"]:
        del o["threat_model"]
    del metrics["threat_model"]
    (out / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    check_metrics(metrics, out / "metrics.json")
    render_report(out, name="old")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "inverting_gradients" in html and "[SoK" not in html
    with pytest.raises(ValueError, match="threat_model"):
        check_metrics({"attacks": [{"attack": "x", "threat_model": 3}]}, out / "metrics.json")


def test_a_scale_sensitive_distance_with_granted_hyperparameters_needs_training_details() -> None:
    """DLG (paper letter A) rescales a FedAvg delta by the granted lr and steps under an L2 distance: it then uses
    the SoK's 'training details' column, so it needs C; cosine never reads them; E already holds C's columns."""
    from fedsim.attacks.matching import delta_scale_letter
    from fedsim.scenario import Knowledge

    granted, not_granted = Knowledge(local_hparams=True), Knowledge()
    assert delta_scale_letter("A", "l2", granted) == "C"
    assert delta_scale_letter("B", "l1", granted) == "C"
    assert delta_scale_letter("A", "cosine", granted) == "A"
    assert delta_scale_letter("A", "l2", not_granted) == "A"
    assert delta_scale_letter("E", "l2", granted) == "E"
