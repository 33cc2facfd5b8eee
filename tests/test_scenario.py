"""The scenario schema accepts every shipped scenario and rejects broken ones at the right field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedsim.errors import ScenarioError
from fedsim.scenario import apply_overrides, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
# scenarios/priors/ holds prior-training configs (fedsim prior train), validated in test_prior_train.py
SHIPPED = sorted(p for p in (ROOT / "scenarios").rglob("*.yaml") if p.parent.name != "priors")


def base() -> dict:
    return yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_scenarios_validate(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda r: r.update(colour="red"), "colour", "unknown field"),
        (lambda r: r["federation"].update(clients=0), "federation.clients", "greater than or equal to 1"),
        (lambda r: r["federation"]["local"].update(lr="fast"), "federation.local.lr", "valid number"),
        (lambda r: r["federation"].update(protocol="fedprox"), "federation.protocol", "fedsgd"),
        (lambda r: r["federation"].update(clients_per_round=99), "federation", "clients_per_round"),
        (lambda r: r["attacks"][0]["budget"].update(iterations=-1), "attacks[0].budget.iterations",
         "greater than or equal to 0"),
        (lambda r: r["attacks"][0].update(rounds=[7]), "attacks[0].rounds", "outside 1..3"),
        (lambda r: r["attacks"][0].update(rounds=[]), "attacks[0].rounds", "attacks no round"),
        (lambda r: r["attacks"][0].update(clients=[8]), "attacks[0].clients", "outside 0..7"),
        (lambda r: r["attacks"][0].update(name="nope"), "attacks[0].name", "unknown attack"),
        (lambda r: r["attacks"][0].update(params={"tv": "x"}), "attacks[0].params.tv", "valid number"),
        (lambda r: r["attacks"][0].update(params={"bogus": 1}), "attacks[0].params.bogus", "unknown field"),
        (lambda r: r["attacks"][0]["knowledge"].update(labels="maybe"), "attacks[0].knowledge.labels", "infer"),
        (lambda r: r.update(defenses=[{"name": "gaussian_noise", "params": {"sigma": -1}}]),
         "defenses[0].params.sigma", "greater than or equal to 0"),
        (lambda r: r["data"].update(dataset="imagenet-tiny"), "data.dataset", "unknown dataset"),
        (lambda r: r["model"].update(name="vgg"), "model.name", "unknown model"),
        (lambda r: r["model"].update(norm="layer"), "model.norm", "none"),
    ],
)
def test_broken_scenarios_name_the_field(mutate, path: str, reason: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert info.value.path == path, str(info.value)
    assert reason in info.value.reason, str(info.value)


def test_overrides_set_nested_values_and_list_items() -> None:
    raw = apply_overrides(base(), ["federation.rounds=5", "attacks.0.budget.iterations=10", "seed=3"])
    scenario = parse_scenario(raw)
    assert scenario.federation.rounds == 5 and scenario.seed == 3
    assert scenario.attacks[0].budget.iterations == 10


def test_bad_override_is_a_scenario_error() -> None:
    with pytest.raises(ScenarioError, match="key.path=value"):
        apply_overrides(base(), ["federation.rounds"])
    with pytest.raises(ScenarioError, match="no list item"):
        apply_overrides(base(), ["attacks.5.name=x"])


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "missing.yaml")


def test_attack_targets() -> None:
    raw = base()
    raw["attacks"][0].update(every=2, clients="all")
    raw["attacks"][0].pop("rounds", None)  # rounds with every is refused (one would silently win)
    spec = parse_scenario(raw).attacks[0]
    assert spec.target_rounds(5) == [1, 3, 5]
    assert spec.target_clients(3) == [0, 1, 2]


@pytest.mark.parametrize(("path", "value"), [
    ("federation.local.lr", float("inf")), ("federation.local.lr", float("nan")),
    ("defenses", [{"name": "gaussian_noise", "params": {"sigma": float("inf")}}]),
    ("attacks", [{"name": "inverting_gradients", "params": {"tv": float("nan")}}]),
])
def test_non_finite_numbers_are_refused_with_their_path(tiny_raw, path, value) -> None:
    """A NaN or infinite number anywhere in a scenario (lr=.inf used to run and write NaN into
    metrics.json) is refused at validation, naming the field."""
    from fedsim.scenario import set_dotted

    set_dotted(tiny_raw, path, value)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(tiny_raw)
    assert err.value.path.startswith(path.split(".")[0])
