"""A malicious server's round, as the rest of fedsim files it: only a malicious server manipulates (validation and
the server both hold it), an attack on an update answering a manipulated model is filed under the manipulator's SoK
letter in every output, and the accuracy cost in the history row is the honest and the sent models' test accuracy.

The plug-ins and helpers are test_malicious_federation's (test-only, registered per test by its ``_plugins``
fixture). Expected letters come from the SoK table (an eavesdropper reading a manipulated update exercises F),
expected accuracies from this file's own argmax over the test split and a closed form (a constant model).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from test_malicious_federation import (  # noqa: F401 - _plugins: the autouse fixture registering the plug-ins
    ScaleAttack,
    _plugins,
    manipulated_model,
    scenario_raw,
)
from torch import nn

from fedsim.attacks import ATTACKS
from fedsim.data import normalize
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ManipulationView, ServerModel


class EavesdropperLetter(ScaleAttack):
    """A plug-in bug: it manipulates, yet its threat_model_for says B (an informed eavesdropper)."""

    threat_model: ClassVar[str] = "B"


def test_only_a_malicious_server_manipulates(tiny_raw) -> None:
    ATTACKS.add("test_b_manipulator", EavesdropperLetter)
    try:
        raw = scenario_raw(tiny_raw, attack="test_b_manipulator")
        with pytest.raises(ScenarioError, match=r"attacks\[0\]\.name.*B \(Informed Eavesdropper\)"):
            parse_scenario(raw)  # malicious role, but the plug-in files its manipulation under an eavesdropper
        raw["server"] = {"role": "honest_but_curious"}
        with pytest.raises(ScenarioError, match=r"server\.role.*attacks\[0\] \(test_b_manipulator\)"):
            parse_scenario(raw)  # the letter check alone lets B through an honest server
    finally:
        ATTACKS._items.pop("test_b_manipulator", None)
    # past validation (a scenario changed after parsing), an honest server still sends no manipulated model
    scenario = parse_scenario(scenario_raw(tiny_raw, attack="test_scale_attack"))
    honest = scenario.model_copy(update={"server": scenario.server.model_copy(update={"role": "honest_but_curious"})})
    outcome = run_federation(honest)
    assert all("manipulated_clients" not in h for h in outcome.history)
    assert all(u.architecture == () for u in outcome.capture.updates)
    start = setup_for(scenario).build_model().state_dict()
    for u in outcome.capture.updates:  # every client got the honest model
        for k, v in start.items():
            assert torch.equal(u.global_state[k], v)


class ScaleAllAttack(ScaleAttack):
    def manipulate(self, view: ManipulationView) -> ServerModel:
        return dataclasses.replace(super().manipulate(view), to_all=True)


@pytest.mark.parametrize("case", ["targeted", "to_all", "secagg"])
def test_an_attack_on_a_manipulated_update_is_filed_under_the_manipulators_letter(tiny_raw, tmp_path, case) -> None:
    """The honest IG (SoK B) reading an update that answers the scaled model leaks what an F server would: every
    output files it under F and names the manipulator; IG on an honest client's update stays B."""
    import json

    from fedsim.run import run_scenario

    ATTACKS.add("test_scale_all", ScaleAllAttack)
    try:
        raw = scenario_raw(tiny_raw, attack="test_scale_all" if case == "to_all" else "test_scale_attack")
        if case == "secagg":
            raw["defenses"] = [{"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}]
        result = run_scenario(parse_scenario(raw), tmp_path / "run")
    finally:
        ATTACKS._items.pop("test_scale_all", None)
    ig = {o.partition_id: o for o in result.outcomes if o.attack == "inverting_gradients"}
    manipulated = {-1} if case == "secagg" else {0, 1, 2, 3} if case == "to_all" else {1}
    assert set(ig) == ({-1} if case == "secagg" else {0, 1, 2, 3})
    for pid, o in ig.items():
        assert (o.threat_model, o.manipulated_by) == (("F", (0, raw["attacks"][0]["name"])) if pid in manipulated
                                                      else ("B", None)), pid
    records = [a for a in json.loads((tmp_path / "run" / "metrics.json").read_text())["attacks"]
               if a["attack"] == "inverting_gradients"]
    for a in records:
        if a["client"] in manipulated:
            assert a["threat_model"] == "F" and a["manipulated_by"] == {"attack_index": 0,
                                                                        "attack": raw["attacks"][0]["name"]}
        else:
            assert a["threat_model"] == "B" and "manipulated_by" not in a
    tag = f"inverting_gradients [SoK F: on the model manipulated by {raw['attacks'][0]['name']}]"
    assert tag in (tmp_path / "run" / "summary.md").read_text()
    assert tag in (tmp_path / "run" / "report.html").read_text()


CLASS = 3  # the class the constant model predicts for every input


class ConstantAttack(ScaleAttack):
    """Zeroes the last layer's weights and biases it to CLASS: the sent model's test accuracy is the share of CLASS
    in the test split (a closed form), whatever the honest model learnt."""

    def manipulate(self, view: ManipulationView) -> ServerModel:
        last = [k for k, v in view.global_state.items() if v.dim() == 2][-1]
        bias = last.rsplit(".", 1)[0] + ".bias"
        state = dict(view.global_state)
        state[last] = torch.zeros_like(state[last])
        state[bias] = 5.0 * F.one_hot(torch.tensor(CLASS), len(state[bias])).to(state[bias].dtype)
        return ServerModel(state, note="constant prediction")


def _argmax_accuracy(model: nn.Module, setup) -> float:
    """Top-1 accuracy on the test split, computed here (not fedsim.training.evaluate)."""
    data = setup.data
    model.eval()
    with torch.no_grad():
        predicted = model(normalize(data.test_x, data.mean, data.std)).argmax(1)
    return float((predicted == data.test_y).double().mean())


def test_the_accuracy_cost_is_the_honest_and_the_sent_models_test_accuracy(tiny_raw) -> None:
    ATTACKS.add("test_constant_attack", ConstantAttack)
    try:
        raw = scenario_raw(tiny_raw, attack="test_constant_attack", rounds=2)
        raw["attacks"][0]["rounds"] = raw["attacks"][1]["rounds"] = [2]  # the honest model of round 2 has learnt
        raw["model"]["width"] = 16
        scenario = parse_scenario(raw)
        outcome = run_federation(scenario)
    finally:
        ATTACKS._items.pop("test_constant_attack", None)
    setup = setup_for(scenario)
    caps = {u.partition_id: u for u in outcome.capture.updates if u.round == 2}
    honest = _argmax_accuracy(manipulated_model(setup, caps[0].global_state, ()), setup)  # client 0: honest model
    sent = _argmax_accuracy(manipulated_model(setup, caps[1].global_state, ()), setup)
    assert sent == pytest.approx(float((setup.data.test_y == CLASS).double().mean()))  # the closed form
    assert honest - sent > 0.05, (honest, sent)  # a real, known drop (so equal numbers cannot pass)
    row = next(h for h in outcome.history if h["round"] == 2)
    assert row["honest_test_accuracy"] == pytest.approx(honest)
    assert row["sent_test_accuracy"] == pytest.approx(sent)
    assert row["sent_accuracy_drop"] == pytest.approx(honest - sent)
    assert row["sent_test_examples"] == len(setup.data.test_y)  # the denominator the tables show when small
