"""Central DP (Flower wrappers): what the curious server captures, what the model gets, and epsilon."""

from __future__ import annotations

import pytest
import torch

from fedsim.defenses.central_dp import CentralDP, central_dp_epsilon
from fedsim.defenses.dp_sgd import import_opacus
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


def fedavg_of(caps, deltas, uniform: bool = True) -> dict[str, torch.Tensor]:
    """global + sum_k w_k delta_k: central DP's uniform mean (w_k = 1/K), or FedAvg's n_k / n."""
    total = len(caps) if uniform else sum(c.num_examples for c in caps)
    start = caps[0].global_state
    return {k: start[k] + sum((1 if uniform else c.num_examples) / total * d[k]
                              for c, d in zip(caps, deltas, strict=True))
            for k in start}


@pytest.fixture
def unequal_raw(fedavg_raw) -> dict:
    """Dirichlet(0.5) clients of 596 / 192 / 398 / 251 examples, one local epoch each (FedAvg weighs them by
    those counts); the MLP (width 2) has 4426 weights."""
    fedavg_raw["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.5}
    fedavg_raw["federation"]["local"] = {"batch_size": 64, "lr": 0.2, "epochs": 1}
    return fedavg_raw


CASES = [("server", "fixed"), ("client", "fixed"), ("server", "adaptive"), ("client", "adaptive")]


@pytest.mark.parametrize(("side", "clipping"), CASES)
def test_central_dp_releases_the_uniform_mean_of_clipped_updates_for_unequal_clients(unequal_raw, side,
                                                                                      clipping) -> None:
    """sigma = 0: the released model is global + (1/K) sum_k clip(delta_k), recomputed here by brute force,
    not FedAvg's num-examples-weighted mean (which differs by > 1e-3 here); adaptive clipping's first
    round clips at initial_clipping_norm."""
    norm = {"clipping_norm": 0.1} if clipping == "fixed" else {"initial_clipping_norm": 0.1}
    outcome = run_federation(parse_scenario(with_cdp(unequal_raw, side=side, clipping=clipping,
                                                     noise_multiplier=0.0, **norm)))
    caps = outcome.capture.updates
    assert len(caps) == 4 and len({c.num_examples for c in caps}) == 4  # unequal weights
    clipped = [clip(c.update, 0.1) for c in caps]
    expected, weighted = fedavg_of(caps, clipped), fedavg_of(caps, clipped, uniform=False)
    assert (flat(expected) - flat(weighted)).abs().max() > 1e-3  # the two rules are told apart
    for k, v in outcome.final_state.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)


def test_central_dp_noise_on_the_uniform_mean_has_std_sigma_c_over_k_and_epsilon_is_for_that_sigma(
        unequal_raw) -> None:
    """sigma = 1, C = 0.1, K = 4: released - (brute-force uniform clipped mean) is the noise, std 0.025
    (measured over 4426 weights, standard error 1 %: within 5 %), mean ~ 0; epsilon is dp_accounting's."""
    import dp_accounting
    from dp_accounting import rdp

    scenario = parse_scenario(with_cdp(unequal_raw, clipping_norm=0.1, noise_multiplier=1.0))
    outcome = run_federation(scenario)
    caps = outcome.capture.updates
    noise = flat(outcome.final_state) - flat(fedavg_of(caps, [clip(c.update, 0.1) for c in caps]))
    assert noise.std().item() == pytest.approx(1.0 * 0.1 / 4, rel=0.05)
    assert abs(noise.mean().item()) < 3 * 0.025 / noise.numel() ** 0.5
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0))  # full participation, one release
    assert central_dp_epsilon(scenario)[0] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)


def test_server_side_capture_is_raw_while_the_model_is_clipped_and_noised(fedavg_raw) -> None:
    raw_caps = run_federation(parse_scenario(fedavg_raw)).capture.updates
    quiet = run_federation(parse_scenario(with_cdp(fedavg_raw, clipping_norm=0.1, noise_multiplier=0.0)))
    for before, seen in zip(raw_caps, quiet.capture.updates, strict=True):
        assert all(torch.equal(before.update[k], v) for k, v in seen.update.items())  # raw, unclipped
        assert flat(seen.update).norm() > 0.2
    caps = quiet.capture.updates
    expected = fedavg_of(caps, [clip(c.update, 0.1) for c in caps])  # uniform (iid: equal weights anyway)
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
    assert defense.server_round_metrics(2) == {"epsilon": eps[1], "delta": 1e-5, "noise_multiplier": 1.0,
                                               "sample_rate": 0.5}
    # ...and the run's per-round history carries it
    history = run_federation(scenario).history
    assert [h.get("epsilon") for h in history] == [None, *eps]


@pytest.mark.parametrize(("change", "params", "match", "path"), [
    ({"protocol": "fedsgd"}, {}, "fedavg", "defenses[0]"),
    ({}, {"clipping": "adaptive", "noise_multiplier": 1.0}, "clipped_count_stddev", "defenses[0]"),
    ({}, {"initial_clipping_norm": 0.2}, "does not apply", "defenses[0].params.initial_clipping_norm"),
])
def test_invalid_combinations_are_refused_at_the_defense_path(fedavg_raw, change, params, match, path) -> None:
    fedavg_raw["federation"].update(change)
    with pytest.raises(ScenarioError, match=match) as err:
        parse_scenario(with_cdp(fedavg_raw, **params))
    assert err.value.path == path


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clipping_noise_uses_the_norm_the_round_was_clipped_to(unequal_raw, side) -> None:
    """Andrew et al. (NeurIPS 2021, Alg. 1): round t's noise is sigma_update * C_t / K with C_t the norm the
    updates were clipped to, and the norm moves afterwards. Every raw update (norms > 0.2) exceeds the initial
    C = 0.1, so the clipped fraction is ~1 and the norm then falls to ~0.1 exp(-0.2 * 0.5) = 0.0905: noising with
    the updated norm (Flower 1.42's order) gives a std 9.5 % low. sigma_update comes from the paper's Thm. 1,
    (z^-2 - (2 sigma_b)^-2)^-1/2 with z = 0.3 and sigma_b = K / 20 = 0.2, not from Flower."""
    z, k, c0 = 0.3, 4, 0.1
    sigma_update = (z ** -2 - (2 * k / 20) ** -2) ** -0.5
    scenario = parse_scenario(with_cdp(unequal_raw, side=side, clipping="adaptive", noise_multiplier=z,
                                       initial_clipping_norm=c0))
    outcome = run_federation(scenario)
    caps = outcome.capture.updates
    # every update is clipped in round 1 (side client: the server captures it clipped, at norm C)
    assert all(flat(c.update).norm().item() > c0 - 1e-6 for c in caps)
    noise = flat(outcome.final_state) - flat(fedavg_of(caps, [clip(c.update, c0) for c in caps]))
    assert noise.std().item() == pytest.approx(sigma_update * c0 / k, rel=0.04)  # 4426 weights: ~1.1 % error
