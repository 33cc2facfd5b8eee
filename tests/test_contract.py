"""The firewall: attacks see what the server legitimately sees, and never ground truth."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from helpers import referenced_names

import fedsim.attacks as attacks
from fedsim.attacking import observe
from fedsim.attacks.base import Attack, AttackParams
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ClientUpdate

ATTACK_DIR = Path(attacks.__file__).parent
# fedsim.data / the prior's data loader would hand an attack the clients' (or the evaluator's) images.
FORBIDDEN = {"GroundTruth", "CapturedUpdate", "fedsim.simulation", "fedsim.metrics", "fedsim.attacking",
             "fedsim.data", "fedsim.priors.data", "fedsim.priors.train"}


@pytest.mark.parametrize("path", sorted(ATTACK_DIR.glob("*.py")), ids=lambda p: p.name)
def test_attack_modules_cannot_reach_ground_truth(path: Path) -> None:
    names = referenced_names(path)
    hits = {n for n in names for bad in FORBIDDEN if n == bad or n.startswith(bad + ".")}
    assert not hits, f"{path.name} references {hits}"


def test_reconstruct_takes_only_the_observed_update() -> None:
    params = list(inspect.signature(Attack.reconstruct).parameters)
    assert params == ["self", "update", "progress"]
    for name, cls in attacks.ATTACKS.items():
        assert list(inspect.signature(cls.reconstruct).parameters) == params, name


def test_client_update_carries_no_client_data_fields() -> None:
    fields = {f.name for f in dataclasses.fields(ClientUpdate)}
    # reference_state is a global model the server itself sent (DIFF2's x_{r-1}), not client data; staleness is
    # the lag of the model the server chose to send; architecture the changes a malicious server itself shipped
    assert fields == {"round", "partition_id", "task", "global_state", "update", "num_examples",
                      "reference_state", "staleness", "hyperparams", "side_info", "defenses", "architecture"}


def test_knowledge_decides_what_the_view_holds(tiny_raw) -> None:
    scenario = parse_scenario(tiny_raw)
    (cap,) = run_federation(scenario).capture.updates
    task = setup_for(scenario).task
    blind = observe(cap, task, scenario, scenario.attacks[0], [{"name": "x"}])
    assert dict(blind.side_info) == {} and dict(blind.hyperparams) == {} and blind.defenses == ()
    tiny_raw["attacks"][0]["knowledge"] = {"labels": "known", "local_hparams": True, "defense": True}
    tiny_raw["defenses"] = [{"name": "clipping"}]  # a defense-aware mode needs a defense it can model
    scenario = parse_scenario(tiny_raw)
    told = observe(cap, task, scenario, scenario.attacks[0], [{"name": "x"}])
    assert told.side_info["labels"].tolist() == cap.truth.labels.tolist()
    assert told.hyperparams["lr"] == 0.5 and told.defenses == ({"name": "x"},)
    # the view is a copy: editing it cannot change what was captured (or another attack's view)
    key = next(iter(told.update))
    told.update[key].add_(1.0)
    assert not (cap.update[key] == told.update[key]).all()
    with pytest.raises(TypeError):
        told.side_info["labels"] = None  # read-only mapping


class _NeedsHparams(Attack):
    needs = {"local_hparams": True}
    protocols = ("fedavg",)
    Params = AttackParams

    def reconstruct(self, update, progress=None):  # pragma: no cover - never runs
        raise AssertionError


def test_attack_refuses_a_threat_model_that_does_not_grant_what_it_needs(tiny_raw) -> None:
    attacks.ATTACKS.add("needs_hparams_test", _NeedsHparams)
    try:
        tiny_raw["attacks"][0]["name"] = "needs_hparams_test"
        with pytest.raises(ScenarioError) as info:
            parse_scenario(tiny_raw)
        assert info.value.path == "federation.protocol" and "fedavg" in info.value.reason
        tiny_raw["federation"]["protocol"] = "fedavg"
        with pytest.raises(ScenarioError, match=r"attacks\[0\]\.knowledge\.local_hparams: .*needs true"):
            parse_scenario(tiny_raw)
        tiny_raw["attacks"][0]["knowledge"] = {"local_hparams": True}
        parse_scenario(tiny_raw)
    finally:
        attacks.ATTACKS._items.pop("needs_hparams_test")
