"""What ``validate`` accepts must run: every registered defense, alone and in every pair, under both
protocols, and every registered attack with its defaults, either runs one tiny round cleanly or is
refused at validation with a one-line error naming a field path.

The combinations come from the registries, not from a hand-written list, so a new defense or attack
is crossed with everything else the moment it is registered. Each case runs the real pipeline
(in-process Flower federation, 3 clients, 1 round; 3 because ``secagg`` needs ``num_shares`` >= 3
clients). The default suite crosses every pair with default parameters; ``-m slow`` adds every
parameter setting that changes what a defense does to the model or the training (DP-SGD's
per-sample gradient modes, central DP's variants, ...) crossed pairwise and with every model.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from typing import Any

import pytest

from fedsim.errors import ScenarioError
from fedsim.models import MODELS, TEXT_MODELS
from fedsim.plugins import attack_registry, defense_registry
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario

BASE: dict[str, Any] = {
    "name": "pairs",
    "seed": 3,
    "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 24},
    "model": {"name": "mlp", "width": 4},
    "federation": {"clients": 3, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 4, "lr": 0.1}},
    "backend": {"kind": "inprocess"},
    "evaluation": {"batch_size": 64},
}
PROTOCOLS = ("fedsgd", "fedavg")
# Parameters a defense cannot do without (no default exists); every other defense runs on its defaults.
REQUIRED: dict[str, dict[str, Any]] = {"dp_sgd": {"noise_multiplier": 1.0}, "dp_sat": {"noise_multiplier": 1.0},
                                       "dp_sam": {"noise_multiplier": 1.0},
                                       "diff2": {"restart_period": 2, "sigma1": 0.05, "sigma2": 0.1}}
# Settings that change the model or the training path (the slow cross runs each of them).
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "dp_sgd": [{"noise_multiplier": 1.0, "grad_sample_mode": m} for m in ("hooks", "functorch", "ew", "ghost")]
    + [{"noise_multiplier": 1.0, "poisson": False}],
    "dp_sat": [{"noise_multiplier": 1.0, "persist": True, "grad_sample_mode": m} for m in ("hooks", "ghost")]
    + [{"noise_multiplier": 1.0, "variant": "momentum"}],
    "dp_sam": [{"noise_multiplier": 1.0, "grad_sample_mode": m} for m in ("hooks", "ghost")],
    "central_dp": [{"side": s, "clipping": c} for s in ("server", "client") for c in ("fixed", "adaptive")],
    "quantization": [{}, {"stochastic": True}],
    "diff2": [{"restart_period": 2, "target_epsilon": 3.0, "noise_placement": p} for p in ("central", "local")]
    + [{"restart_period": 1, "c1": None, "sigma1": 0.0}],
}

NAMES = defense_registry().names()
# Opacus hooks on inputs that need no gradient; RDP at an extreme sigma (both expected, see dp_sgd.py)
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the")]
COMBOS = [(n,) for n in NAMES] + list(itertools.combinations_with_replacement(NAMES, 2))

IMAGE_MODELS = [m for m in MODELS.names() if m not in TEXT_MODELS]


def _raw(protocol: str, defenses: list[tuple[str, dict[str, Any]]], model: dict | None = None) -> dict:
    raw = copy.deepcopy(BASE)
    raw["federation"]["protocol"] = protocol
    raw["defenses"] = [{"name": n, "params": dict(p)} for n, p in defenses]
    if model is not None:
        raw["model"] = model
    return raw


def runs_or_is_refused(raw: dict) -> str:
    """'refused' (a one-line ScenarioError with a field path) or 'ran' (one clean round); anything else fails."""
    try:
        scenario = parse_scenario(raw)
    except ScenarioError as err:
        assert err.path, f"refused without a field path: {err}"
        assert "\n" not in str(err), f"refusal is not one line: {err!r}"
        return "refused"
    result = run_scenario(scenario, write=False)  # raises on a client that fails: the test fails
    assert not getattr(result, "client_failures", []), result.client_failures
    rounds = [h for h in result.history if h.get("round") == 1]
    assert rounds, result.history
    assert all(not o.failed for o in result.outcomes), [o.failed for o in result.outcomes]
    return "ran"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("fedsim").setLevel(logging.ERROR)  # DP-SGD's BatchNorm notice, once per process


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
def test_every_defense_pair_runs_or_is_refused(combo: tuple[str, ...], protocol: str) -> None:
    runs_or_is_refused(_raw(protocol, [(n, REQUIRED.get(n, {})) for n in combo]))


@pytest.mark.parametrize("name", NAMES)
def test_every_defense_runs_alone_under_some_protocol(name: str) -> None:
    """A defense refused under both protocols on its defaults would make the pair cross vacuous for it."""
    outcomes = [runs_or_is_refused(_raw(p, [(name, REQUIRED.get(name, {}))])) for p in PROTOCOLS]
    assert "ran" in outcomes, f"{name} is refused under both protocols: give it REQUIRED parameters"


CASES = [(name, i, p) for name, settings in SETTINGS.items() for i, p in enumerate(settings)]


@pytest.mark.parametrize(("name", "index", "params"), CASES, ids=[f"{n}{i}" for n, i, _ in CASES])
def test_every_setting_on_every_model_default_subset(name: str, index: int, params: dict) -> None:
    """Each setting that changes the model or the training, on every registered model, norms and
    protocols rotating deterministically (the slow test below crosses all of them)."""
    for j, model in enumerate(IMAGE_MODELS):
        norm = ("none", "batch", "group")[(index + j) % 3]
        protocol = PROTOCOLS[(index + j) % 2]
        runs_or_is_refused(_raw(protocol, [(name, params)], {"name": model, "width": 4, "norm": norm}))


def _all_settings() -> list[tuple[str, dict[str, Any]]]:
    return [(n, p) for n in NAMES for p in SETTINGS.get(n, [REQUIRED.get(n, {})])]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_setting_pair_runs_or_is_refused_exhaustive(protocol: str) -> None:
    settings = _all_settings()
    for a, b in itertools.combinations_with_replacement(settings, 2):
        runs_or_is_refused(_raw(protocol, [a, b]))


@pytest.mark.slow
@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_every_setting_on_every_model_exhaustive(model: str) -> None:
    for protocol, norm in itertools.product(PROTOCOLS, ("none", "batch", "group")):
        for setting in [None, *_all_settings()]:
            runs_or_is_refused(_raw(protocol, [setting] if setting else [], {"name": model, "width": 4, "norm": norm}))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("attack", attack_registry().names())
def test_every_attack_on_its_defaults_runs_or_is_refused(attack: str, protocol: str) -> None:
    raw = _raw(protocol, [])
    raw["attacks"] = [{"name": attack, "budget": {"iterations": 1}}]
    if runs_or_is_refused(raw) == "ran":
        return
    # refused: it must be the attack's own precondition, never a broken base scenario (the attack's refusal may
    # name the scenario field to edit, e.g. model.name or federation.protocol)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    parse_scenario({**raw, "attacks": []})  # the base alone is sound
    assert err.value.path.startswith(("attacks[0]", "model.", "federation.", "data.", "server.")), str(err.value)


def test_the_base_scenario_and_its_round_are_sound() -> None:
    """The cross is only as good as its base: no defense runs and trains (finite loss)."""
    scenario = parse_scenario(_raw("fedavg", []))
    result = run_scenario(scenario, write=False)
    assert math.isfinite(result.history[-1]["test_loss"])
