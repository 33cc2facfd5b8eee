"""DP-SGD in the client (Opacus): accounting across rounds, clipping, noise, reproducibility, attacks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import assert_beats_trivial

from fedsim.defenses import dp_sgd
from fedsim.defenses.dp_sgd import expected_rounds, import_opacus, poisson_batches
from fedsim.errors import ScenarioError
from fedsim.run import run_scenario
from fedsim.scenario import FederationSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for

MODES = ["hooks", "functorch", "ew", "ghost"]
pytestmark = [  # expected (see fedsim.defenses.dp_sgd.import_opacus); pytest re-arms filters per test
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]


def with_dp(raw: dict, **params) -> dict:
    raw["defenses"] = [{"name": "dp_sgd", "params": params}]
    return raw


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in update.values()])


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    import_opacus()
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def test_epsilon_matches_an_independent_rdp_accountant_and_grows_over_rounds(tiny_raw) -> None:
    """Measured (client 0: n=360, q=4/360, sigma=1, 2 steps a round): 1.0059, 1.0308, 1.0473 after rounds 1-3,
    equal to RDPAccountant on (1, q, 2), (1, q, 4), (1, q, 6); target_epsilon=2 gives sigma=0.764 and 1.998."""
    tiny_raw["federation"].update(rounds=3, protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 2})
    scenario = parse_scenario(with_dp(tiny_raw, noise_multiplier=1.0))
    metrics = run_federation(scenario).capture.client_metrics
    for pid in range(4):
        n = len(setup_for(scenario).client_data(pid)[0])
        eps = [metrics[r][pid]["epsilon"] for r in (1, 2, 3)]
        for r, e in zip((1, 2, 3), eps, strict=True):
            assert e == pytest.approx(rdp_epsilon(1.0, 4 / n, 2 * r), rel=1e-9)
        assert eps[0] < eps[1] < eps[2]
        assert metrics[3][pid]["delta"] == 1e-5 and metrics[3][pid]["noise_multiplier"] == 1.0


def test_target_epsilon_is_reached_after_the_planned_rounds(tiny_raw) -> None:
    tiny_raw["federation"].update(rounds=3, protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 2})
    metrics = run_federation(parse_scenario(with_dp(tiny_raw, target_epsilon=2.0))).capture.client_metrics
    for pid in range(4):
        assert 2.0 - 0.02 <= metrics[3][pid]["epsilon"] <= 2.0 + 1e-9  # Opacus bisection tolerance: 0.01
        assert metrics[1][pid]["epsilon"] < metrics[3][pid]["epsilon"]
        assert metrics[1][pid]["noise_multiplier"] == metrics[3][pid]["noise_multiplier"] > 0


def test_expected_rounds_under_partial_participation() -> None:
    assert expected_rounds(FederationSpec(clients=4, rounds=3)) == 3
    assert expected_rounds(FederationSpec(clients=10, rounds=5, clients_per_round=3)) == 2  # ceil(1.5)


def brute_force_clipped_mean(scenario, captured, clip: float) -> torch.Tensor:
    """(sum_i clip(g_i, C)) / B from scratch: each example's gradient by plain autograd on the global model
    the client received, scaled by min(1, C / (|g_i| + 1e-6)) (Opacus' flat clipping), summed, over B."""
    import torch.nn.functional as F

    from fedsim.data import normalize

    setup = setup_for(scenario)
    model = setup.build_model()
    model.load_state_dict(dict(captured.global_state))
    model.train()
    data = setup.data
    total = None
    for x, y in zip(captured.truth.inputs, captured.truth.labels, strict=True):
        loss = F.cross_entropy(model(normalize(x[None], data.mean, data.std)), y[None])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(model.parameters()))])
        g = g * min(1.0, clip / (g.norm().item() + 1e-6))
        assert g.norm() <= clip * (1 + 1e-6)  # each example's contribution, hence the sensitivity, is bounded
        total = g if total is None else total + g
    return total / len(captured.truth.inputs)


@pytest.mark.parametrize("mode", MODES)
def test_sent_gradient_is_the_mean_of_per_example_clipped_gradients(tiny_raw, mode) -> None:
    """fedsgd with sigma ~ 0 and a fixed batch of B = 8: the sent gradient equals (sum_i clip(g_i, C)) / B
    recomputed example by example here (not only its norm: clipping the batch's mean to C would also give
    a norm <= C, and is checked to be far from what was sent)."""
    tiny_raw["federation"]["local"]["batch_size"] = 8
    clean = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    with_dp(tiny_raw, noise_multiplier=1e-6, max_grad_norm=0.05, poisson=False, grad_sample_mode=mode)
    scenario = parse_scenario(tiny_raw)
    clipped = run_federation(scenario).capture.updates[0]
    assert torch.equal(clean.truth.inputs, clipped.truth.inputs)  # same batch, so the clip is what differs
    assert flat(clean.update).norm() > 0.05  # clipping is active
    sent = flat(clipped.update)
    assert sent.norm() <= 0.05 * (1 + 1e-4)
    expected = brute_force_clipped_mean(scenario, clipped, 0.05)
    # float32 sums of 8 per-example gradients (~1e-7 relative each) plus noise of std 1e-6 * C / B
    assert torch.allclose(sent, expected, rtol=1e-4, atol=1e-6), (sent - expected).abs().max()
    mean = flat(clean.update)
    batch_clipped = mean * min(1.0, 0.05 / mean.norm().item())
    assert (sent - batch_clipped).norm() > 10 * (sent - expected).norm() + 1e-4


def test_ghost_mode_really_clips_with_ghost_norms(tiny_raw, monkeypatch) -> None:
    """grad_sample_mode: ghost uses Opacus' fast-gradient-clipping module and optimizer, and no per-example
    gradient is ever materialised (only per-example norms); the result is still the per-example clip."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    seen: list[dict[str, object]] = []
    original = dp_sgd._PrivateRound.before_read_gradients

    def spy(self, optimizer) -> None:
        params = list(self.model.parameters())
        seen.append({"optimizer": type(optimizer), "module": type(self.hooks),
                     "ghost": getattr(self.hooks, "use_ghost_clipping", None),
                     "grad_samples": [getattr(q, "grad_sample", None) for q in params],
                     "norms": [getattr(q, "_norm_sample", None) for q in params]})
        original(self, optimizer)

    monkeypatch.setattr(dp_sgd._PrivateRound, "before_read_gradients", spy)
    tiny_raw["federation"]["local"]["batch_size"] = 8
    with_dp(tiny_raw, noise_multiplier=1e-6, max_grad_norm=0.05, poisson=False, grad_sample_mode="ghost")
    scenario = parse_scenario(tiny_raw)
    clipped = run_federation(scenario).capture.updates[0]
    assert seen and all(s["optimizer"] is DPOptimizerFastGradientClipping for s in seen)
    assert all(issubclass(s["module"], GradSampleHooksFastGradientClipping) for s in seen)
    assert all(s["ghost"] is True for s in seen)
    assert all(g is None for s in seen for g in s["grad_samples"]), "ghost mode materialised per-example grads"
    assert all(n is not None and n.shape[0] == 8 for s in seen for n in s["norms"])  # one norm per example
    expected = brute_force_clipped_mean(scenario, clipped, 0.05)
    assert torch.allclose(flat(clipped.update), expected, rtol=1e-4, atol=1e-6)


def test_noise_has_std_sigma_c_over_b(tiny_raw) -> None:
    tiny_raw["federation"]["local"]["batch_size"] = 8
    runs = [run_federation(parse_scenario(with_dp(tiny_raw, noise_multiplier=s, max_grad_norm=0.05, poisson=False)))
            for s in (0.0, 0.5)]
    quiet, noisy = (r.capture.updates[0].update for r in runs)
    diff = flat(noisy) - flat(quiet)
    assert diff.std().item() == pytest.approx(0.5 * 0.05 / 8, rel=0.1)


def test_same_seed_gives_identical_updates_and_another_seed_other_noise(tiny_raw) -> None:
    tiny_raw["federation"].update(protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 2})
    with_dp(tiny_raw, noise_multiplier=1.0)
    a, b = (run_federation(parse_scenario(tiny_raw)) for _ in range(2))
    assert all(torch.equal(a.capture.updates[0].update[k], v) for k, v in b.capture.updates[0].update.items())
    assert [h.get("test_loss") for h in a.history] == [h.get("test_loss") for h in b.history]
    tiny_raw["seed"] = 8
    c = run_federation(parse_scenario(tiny_raw))
    assert not torch.equal(flat(a.capture.updates[0].update), flat(c.capture.updates[0].update))


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_poisson_batch_sends_noise_only(tiny_raw, mode) -> None:
    """fedsgd with batch_size 1: each client's Poisson batch is empty with probability ~(1-1/n)^n = 0.37."""
    tiny_raw["attacks"][0].update(clients="all", rounds=[1, 2])
    tiny_raw["federation"]["local"]["batch_size"] = 1
    scenario = parse_scenario(with_dp(tiny_raw, noise_multiplier=1.0, max_grad_norm=0.5, grad_sample_mode=mode))
    outcome = run_federation(scenario)
    empty = [u for u in outcome.capture.updates if len(u.truth.inputs) == 0]
    assert empty, "seed 7 draws empty batches (rounds 1 and 2)"
    for u in empty:
        noise = flat(u.update)
        assert torch.isfinite(noise).all() and noise.std().item() == pytest.approx(0.5, rel=0.1)  # sigma*C/1
    assert all(math.isfinite(outcome.capture.client_metrics[2][p]["epsilon"]) for p in range(4))
    assert math.isfinite(outcome.history[-1]["test_loss"])


def test_poisson_batches_have_the_expected_size() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = poisson_batches(100, 0.05, 2000, gen)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(5.0, rel=0.05)
    assert (sizes == 0).any() and all(b.unique().numel() == len(b) for b in batches)


def test_batchnorm_is_replaced_by_groupnorm_with_one_notice(tiny_raw, caplog, monkeypatch) -> None:
    monkeypatch.setattr(dp_sgd, "_BN_NOTICE_SHOWN", False)  # the notice shows once per process
    tiny_raw["model"]["norm"] = "batch"
    tiny_raw["federation"].update(protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 2})
    with caplog.at_level(logging.WARNING, logger="fedsim"):  # validation builds the model too
        scenario = parse_scenario(with_dp(tiny_raw, noise_multiplier=1.0))
        result = run_scenario(scenario, write=False)  # clients, server and the attacker's rebuild
    notices = [r for r in caplog.records if r.name == "fedsim" and "GroupNorm" in r.getMessage()]
    assert len(notices) == 1
    model = setup_for(scenario).build_model()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert not any("running_mean" in k for k in model.state_dict())
    assert math.isfinite(result.history[-1]["test_loss"]) and result.outcomes[0].failed is None


@pytest.mark.parametrize("params", [{}, {"noise_multiplier": 1.0, "target_epsilon": 3.0}])
def test_exactly_one_of_sigma_and_target_epsilon(tiny_raw, params) -> None:
    with pytest.raises(ScenarioError, match="exactly one of") as err:
        parse_scenario(with_dp(tiny_raw, **params))
    assert err.value.path == "defenses[0]"


def ig_scenario(defenses: list[dict]):
    return parse_scenario({
        "name": "dp-vs-ig", "seed": 0, "device": "cpu",
        "data": {"dataset": "cifar10-mini", "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 32},
        "federation": {"clients": 8, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 1, "lr": 0.1}},
        "backend": {"kind": "inprocess"},
        "defenses": defenses,
        "attacks": [{"name": "inverting_gradients", "rounds": [1], "clients": [0], "budget": {"iterations": 250}}],
    })


def test_dp_sgd_lowers_inverting_gradients_psnr() -> None:
    """Real bundled CIFAR-10 image, ConvNet(32), batch 1, FedSGD, IG with 250 iterations, seed 0.

    Measured: no defense PSNR 22.3 dB; DP-SGD with sigma=1, C=1 (epsilon 3.89 for this one step at
    q=1/2) PSNR 12.0 dB; sigma=0.1 gives 12.2 dB and sigma=0.01 15.0 dB. The image's flat mean colour
    scores 14.8 dB (tests/helpers.trivial_guesses), so only the undefended attack beats a blind guess.
    The batch is fixed (``poisson: false``) so that both runs attack the same image.
    """
    base = run_scenario(ig_scenario([]), write=False)
    dp = run_scenario(ig_scenario([{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "poisson": False}}]),
                      write=False)
    base_psnr, dp_psnr = base.outcomes[0].metrics["psnr_mean"], dp.outcomes[0].metrics["psnr_mean"]
    assert torch.equal(base.outcomes[0].truth, dp.outcomes[0].truth)  # the same image attacked
    guess = assert_beats_trivial(base_psnr, base.outcomes[0].truth, margin=3.0)  # a flat colour: 14.8 dB
    assert dp_psnr < base_psnr - 5.0
    assert dp_psnr < guess + 1.0  # under DP the attack does no better than a flat guess
    assert dp.client_metrics[1][0]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1 / 2, 1), rel=1e-9)


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_a_dp_client_declares_the_expected_count_never_its_realised_poisson_batch(tiny_raw, protocol) -> None:
    """Poisson batches of expected size 4 (fedavg: 2 of them) on 4 clients over seeds 1-4: the realised
    batches vary, while the num-examples the server sees is always q n = 4 (fedavg: the expected number of
    distinct examples, round(n (1 - (1 - 4/n)^2)) = 8), recomputed here from the partition sizes."""
    tiny_raw["attacks"][0].update(clients="all", rounds=[1])
    local = {"batch_size": 4, "lr": 0.2, **({"steps": 2} if protocol == "fedavg" else {})}
    tiny_raw["federation"].update(protocol=protocol, local=local, rounds=1)
    with_dp(tiny_raw, noise_multiplier=1.0)
    declared: dict[int, set[int]] = {}
    realised: dict[int, set[int]] = {}
    for seed in range(1, 5):
        tiny_raw["seed"] = seed
        scenario = parse_scenario(tiny_raw)
        for u in run_federation(scenario).capture.updates:
            declared.setdefault(u.partition_id, set()).add(u.num_examples)
            realised.setdefault(u.partition_id, set()).add(len(u.truth.inputs))
        for pid, part in enumerate(setup_for(scenario).partitions):
            n = len(part)
            assert declared[pid] == {4 if protocol == "fedsgd" else round(n * (1 - (1 - 4 / n) ** 2))}
    assert len(set().union(*realised.values())) > 1  # the Poisson draws did vary; what the server saw did not


@pytest.mark.parametrize("labels", ["infer", "known"])
def test_attacks_under_dp_sgd_reconstruct_the_declared_count_and_are_scored_on_the_real_batch(tiny_raw,
                                                                                             labels) -> None:
    """Seed 3: client 1's round-1 Poisson batch holds 5 examples while it declares 4. Inverting Gradients
    reconstructs the declared 4 (labels inferred) or, when the threat model grants the labels, as many as
    those labels; the evaluator scores against the 5 real images."""
    tiny_raw["seed"] = 3
    tiny_raw["attacks"][0]["knowledge"] = {"labels": labels}
    scenario = parse_scenario(with_dp(tiny_raw, noise_multiplier=1e-3))
    result = run_scenario(scenario, write=False)
    outcome = result.outcomes[0]
    assert outcome.failed is None and len(outcome.truth) == 5
    assert len(outcome.reconstruction) == (4 if labels == "infer" else 5)
    per_image = outcome.metrics["psnr_per_image"]  # every real image scored, against its matched guess
    assert len(per_image) == 5 and all(math.isfinite(v) for v in per_image)


def test_a_round_where_every_sampled_client_draws_an_empty_batch_is_a_noise_only_round(tiny_raw) -> None:
    """digits, train_subset 40, 2 clients, FedAvg, 1 Poisson step of expected size 1 a round, 10 rounds,
    seed 4: some round draws an empty batch on both clients (it ended in ZeroDivisionError in the
    aggregation). Now every round aggregates, and each client's accountant counts every step, empty or
    not: epsilon is dp_accounting's for (1, 1/n, rounds), computed here."""
    import dp_accounting
    from dp_accounting import rdp

    tiny_raw.update(seed=4)
    tiny_raw["data"]["train_subset"] = 40
    tiny_raw["federation"] = {"clients": 2, "rounds": 10, "protocol": "fedavg",
                              "local": {"steps": 1, "batch_size": 1, "lr": 0.1}}
    tiny_raw["attacks"][0].update(clients="all", rounds=list(range(1, 11)))
    scenario = parse_scenario(with_dp(tiny_raw, noise_multiplier=1.0))
    outcome = run_federation(scenario)
    by_round: dict[int, list[int]] = {}
    for u in outcome.capture.updates:
        by_round.setdefault(u.round, []).append(len(u.truth.inputs))
    assert any(sizes == [0, 0] for sizes in by_round.values()), "seed 4 draws an all-empty round"
    assert [h["round"] for h in outcome.history][-1] == 10 and math.isfinite(outcome.history[-1]["test_loss"])
    for pid, part in enumerate(setup_for(scenario).partitions):
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(1 / len(part), dp_accounting.GaussianDpEvent(1.0)), 10))
        assert outcome.capture.client_metrics[10][pid]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
        assert sum(outcome.capture.client_metrics[r][pid]["steps"] for r in range(1, 11)) == 10
