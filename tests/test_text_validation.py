"""Input kinds on text (issue 16): what ``fedsim validate`` accepts on a token dataset must run, and what cannot run
is refused in one line at its field.

* every attack whose ``Attack.inputs`` lacks ``tokens`` (the image attacks, model inversion, GAN priors, the
  malicious-server manipulations) at ``attacks[i]``, and a text attack on images likewise;
* a defense whose ``Defense.inputs`` lacks ``tokens`` (Soteria: its scores are input derivatives) at ``defenses[i]``;
* augmentation, staleness's gi_conversion, and (language modeling) ``slow_class`` / ``evaluation.class_accuracy``;
* the smoke: every registered defense, and every registered attack, that validation accepts on a tiny gpt/bert
  text scenario runs through the federation (no client failure; attacks produce an outcome).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from text_support import tiny_text
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.plugins import attack_registry, defense_registry
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario

IMAGE_ATTACKS = sorted(n for n in attack_registry() if "tokens" not in attack_registry().get(n).inputs)
TEXT_ATTACKS = sorted(n for n in attack_registry() if "tokens" in attack_registry().get(n).inputs)


def refusal(raw: dict[str, Any]) -> ScenarioError:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.parametrize("name", IMAGE_ATTACKS)
def test_an_image_attack_on_text_is_refused_at_its_entry(name: str) -> None:
    raw = tiny_text("gpt", attacks=[{"name": "token_set"}, {"name": name}])
    err = refusal(raw)
    assert err.path == "attacks[1]", err
    assert name in err.reason and "token sequences" in err.reason and "token_set" in err.reason, err


def test_the_text_attacks_are_declared_and_refused_on_images(tiny_raw) -> None:
    assert {"token_set", "tag", "dager"} <= set(TEXT_ATTACKS)
    for name in TEXT_ATTACKS:
        raw = copy.deepcopy(tiny_raw)
        raw["attacks"] = [{"name": name}]
        err = refusal(raw)
        assert err.path == "attacks[0]" and "images" in err.reason and "token sequences" in err.reason, err


def test_soteria_is_refused_on_text_at_its_entry() -> None:
    err = refusal(tiny_text("bert", defenses=[{"name": "clipping"}, {"name": "soteria"}]))
    assert err.path == "defenses[1]" and "soteria" in err.reason and "token" in err.reason, err


@pytest.mark.parametrize(("model", "patch", "path"), [
    ("gpt", {"federation.local.augmentation": "flip_crop"}, "federation.local.augmentation"),
    ("bert", {"federation.protocol": "fedavg",
              "federation.staleness": {"tau": 1, "slow_clients": [1], "aggregation": "gi_conversion"}},
     "federation.staleness.aggregation"),
    ("gpt", {"federation.protocol": "fedavg", "federation.staleness": {"tau": 1, "slow_class": 2}},
     "federation.staleness.slow_class"),
    ("gpt", {"evaluation.class_accuracy": [1]}, "evaluation.class_accuracy"),
    ("bert", {"model.norm": "batch"}, "model.norm"),  # was silently ignored: a LayerNorm in every block
])
def test_what_text_rules_out_is_refused_at_its_field(model: str, patch: dict[str, Any], path: str) -> None:
    err = refusal(patched(tiny_text(model), {"federation.rounds": 3, "federation.clients": 3, **patch}))
    assert err.path == path, err


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_text("gpt", attacks=[{"name": "inverting_gradients"}])))
    result = CliRunner().invoke(app, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "attacks[0]" in lines[0] and "inverting_gradients" in lines[0], lines


def patched(raw: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with dotted ``patch`` keys set."""
    for key, value in patch.items():
        *head, last = key.split(".")
        node = raw
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


# Parameters a defense cannot validate without; the smoke's federation (3 clients, fedsgd) otherwise.
DEFENSE_SETUP: dict[str, dict[str, Any]] = {
    "dp_sgd": {"params": {"noise_multiplier": 1.0}},
    "dp_sam": {"params": {"noise_multiplier": 1.0}},
    "dp_sat": {"params": {"noise_multiplier": 1.0}, "federation.protocol": "fedavg"},
    "diff2": {"params": {"restart_period": 1, "target_epsilon": 8}},
    "central_dp": {"params": {"noise_multiplier": 0.5}, "federation.protocol": "fedavg"},
}


@pytest.mark.parametrize("model", ["gpt", "bert"])
@pytest.mark.parametrize("name", sorted(defense_registry()))
def test_every_defense_validate_accepts_on_text_runs(name: str, model: str) -> None:
    setup = copy.deepcopy(DEFENSE_SETUP.get(name, {}))
    raw = patched(tiny_text(model, defenses=[{"name": name, "params": setup.pop("params", {})}]),
                  {"federation.clients": 3, **setup})
    try:
        scenario = parse_scenario(raw)
    except ScenarioError as err:
        kind = defense_registry().get(name)
        assert "tokens" not in kind.inputs, f"{name} declares tokens but validation refuses it: {err}"
        assert err.path == "defenses[0]", err
        return
    assert "tokens" in defense_registry().get(name).inputs
    result = run_scenario(scenario, write=False)
    assert not result.client_failures, result.client_failures
    assert result.history and all(h["test_loss"] == h["test_loss"] for h in result.history if "test_loss" in h)


@pytest.mark.parametrize("name", TEXT_ATTACKS)
def test_every_text_attack_validate_accepts_runs(name: str) -> None:
    raw = tiny_text("gpt", attacks=[{"name": name, "budget": {"iterations": 2}}])
    raw["model"]["depth"] = 2  # DAGER reads two blocks
    result = run_scenario(parse_scenario(raw), write=False)
    assert len(result.outcomes) == 1 and result.outcomes[0].failed is None, result.outcomes


@pytest.mark.parametrize("patch", [
    {"federation.protocol": "fedavg", "federation.rounds": 3,
     "federation.staleness": {"tau": 1, "slow_clients": [1], "aggregation": "dc_asgd"}},
    {"defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "grad_sample_mode": "ghost"}}],
     "audit": {"level": "example"}},
    {"defenses": [{"name": "central_dp", "params": {"noise_multiplier": 0.5}}], "federation.protocol": "fedavg",
     "audit": {"level": "client"}},
], ids=["staleness", "audit-example", "audit-client"])
def test_staleness_and_audits_validate_and_run_on_text(patch: dict[str, Any]) -> None:
    raw = patched(tiny_text("gpt"), {"federation.clients": 3, **patch})
    result = run_scenario(parse_scenario(raw), write=False)
    assert not result.client_failures and result.history
