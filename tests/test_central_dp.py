"""Central DP (Flower wrappers): what the curious server captures, what the model gets, and epsilon."""

from __future__ import annotations

import pytest
import torch

from defenses.central_dp import CentralDP, central_dp_epsilon
from defenses.dp_sgd import import_opacus
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.strategies import FedSimFedAvg

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


@pytest.fixture
def fedavg_raw(tiny_raw) -> dict:
    """One FedAvg round of 3 local steps on 4 clients, every update captured (raw norms ~0.21-0.30)."""
    tiny_raw["federation"].update(rounds=1, protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 3})
    tiny_raw["attacks"][0].update(clients="all", rounds=[1])
    return tiny_raw


def with_cdp(raw: dict, **params) -> dict:
    raw["defenses"] = [{"name": "central_dp", "params": params}]
    return raw


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in update.values()])


def clip(delta: dict[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    scale = min(1.0, c / flat(delta).norm().item())
    return {k: v * scale for k, v in delta.items()}


def fedavg_of(caps, deltas) -> dict[str, torch.Tensor]:
    """global + sum_k (n_k / n) delta_k, FedAvg's weighting by num-examples."""
    total = sum(c.num_examples for c in caps)
    start = caps[0].global_state
    return {k: start[k] + sum(c.num_examples / total * d[k] for c, d in zip(caps, deltas, strict=True))
            for k in start}


def test_server_side_capture_is_raw_while_the_model_is_clipped_and_noised(fedavg_raw) -> None:
    raw_caps = run_federation(parse_scenario(fedavg_raw)).capture.updates
    quiet = run_federation(parse_scenario(with_cdp(fedavg_raw, clipping_norm=0.1, noise_multiplier=0.0)))
    for before, seen in zip(raw_caps, quiet.capture.updates, strict=True):
        assert all(torch.equal(before.update[k], v) for k, v in seen.update.items())  # raw, unclipped
        assert flat(seen.update).norm() > 0.2
    caps = quiet.capture.updates
    expected = fedavg_of(caps, [clip(c.update, 0.1) for c in caps])
    for k, v in quiet.final_state.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)
    noisy = run_federation(parse_scenario(with_cdp(fedavg_raw, clipping_norm=0.1, noise_multiplier=1.0)))
    noise = flat(noisy.final_state) - flat(expected)
    assert noise.std().item() == pytest.approx(1.0 * 0.1 / 4, rel=0.1)  # sigma * C / K


def test_client_side_capture_is_clipped_but_not_noised(fedavg_raw) -> None:
    outcome = run_federation(parse_scenario(with_cdp(fedavg_raw, side="client", clipping_norm=0.1,
                                                     noise_multiplier=0.0)))
    caps = outcome.capture.updates
    assert len(caps) == 4  # the clipping mod let the ground truth through to the evaluator
    for cap in caps:
        assert flat(cap.update).norm().item() == pytest.approx(0.1, rel=1e-4)  # raw norms are 0.21-0.30
    expected = fedavg_of(caps, [c.update for c in caps])  # the server only averages what it saw
    for k, v in outcome.final_state.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clipping_runs_on_both_sides(fedavg_raw, side) -> None:
    fedavg_raw["federation"]["rounds"] = 2
    fedavg_raw["attacks"][0]["rounds"] = [1, 2]
    outcome = run_federation(parse_scenario(with_cdp(fedavg_raw, side=side, clipping="adaptive",
                                                     noise_multiplier=0.1, initial_clipping_norm=0.1)))
    norms = [flat(c.update).norm().item() for c in outcome.capture.updates]
    assert len(norms) == 8 and all(torch.isfinite(v).all() for v in outcome.final_state.values())
    if side == "client":  # round 1 at the initial norm, then the norm adapts (all clipped: it shrinks)
        assert all(n == pytest.approx(0.1, rel=1e-4) for n in norms[:4])
        assert all(n < 0.1 for n in norms[4:])


def test_same_seed_gives_the_same_noisy_model(fedavg_raw) -> None:
    with_cdp(fedavg_raw, clipping_norm=0.1, noise_multiplier=1.0)
    a, b = (run_federation(parse_scenario(fedavg_raw)).final_state for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epsilon_per_round_matches_an_independent_rdp_accountant(fedavg_raw) -> None:
    """4 clients, 2 a round (q = 0.5), sigma = 1, delta = 1e-5: epsilon 3.89, 5.38, 6.48 after rounds 1-3."""
    import_opacus()
    from opacus.accountants import RDPAccountant

    fedavg_raw["federation"].update(rounds=3, clients_per_round=2)
    scenario = parse_scenario(with_cdp(fedavg_raw, noise_multiplier=1.0))
    eps = central_dp_epsilon(scenario)
    for r, e in enumerate(eps, start=1):
        acc = RDPAccountant()
        acc.history = [(1.0, 0.5, r)]
        assert e == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    defense = CentralDP.from_spec(scenario.defenses[0], scenario)
    defense.wrap_strategy(FedSimFedAvg(scenario, {}))
    assert defense.server_round_metrics(2) == {"epsilon": eps[1], "delta": 1e-5}
    # ...and the run's per-round history carries it
    history = run_federation(scenario).history
    assert [h.get("epsilon") for h in history] == [None, *eps]


@pytest.mark.parametrize(("change", "params", "match"), [
    ({"protocol": "fedsgd"}, {}, "fedavg"),
    ({}, {"clipping": "adaptive", "noise_multiplier": 1.0}, "clipped_count_stddev"),
    ({}, {"initial_clipping_norm": 0.2}, "does not apply"),
])
def test_invalid_combinations_are_refused_at_the_defense_path(fedavg_raw, change, params, match) -> None:
    fedavg_raw["federation"].update(change)
    with pytest.raises(ScenarioError, match=match) as err:
        parse_scenario(with_cdp(fedavg_raw, **params))
    assert err.value.path == "defenses[0]"
