"""Client-side update perturbations: Laplace noise, clipping, pruning, quantization and Soteria.

Each changes the update as specified, is reproducible, its ``attacker_transform`` is its deterministic
part, and each (except clipping, see below) lowers Inverting Gradients' PSNR at a fixed seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from helpers import trivial_score

from fedsim.defenses import DEFENSES, UpdateContext
from fedsim.defenses.clipping import global_norm
from fedsim.defenses.pruning import percentile
from fedsim.defenses.soteria import feature_scores, soteria_mask
from fedsim.errors import ScenarioError
from fedsim.models import build_model
from fedsim.run import run_scenario
from fedsim.scenario import DefenseSpec, ModelSpec, parse_scenario
from fedsim.simulation import run_federation

CTX = UpdateContext(seed=3, round=1, partition_id=0, protocol="fedsgd", num_examples=4)


def make(name: str, **params: Any):
    return DEFENSES.get(name).from_spec(DefenseSpec(name=name, params=params))


def fake_update(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(50, 40, generator=gen), "fc.bias": torch.randn(50, generator=gen) * 3}


# -- Laplace noise -----------------------------------------------------------------------------------

def test_laplace_noise_has_the_right_scale_and_is_recorded_and_seeded() -> None:
    defense = make("laplace_noise", scale=0.05)
    update = {"w": torch.zeros(200_000)}
    noisy, randomness = defense.transform_update(update, CTX)
    noise = randomness["noise/w"]
    torch.testing.assert_close(noisy["w"], update["w"] + noise)
    assert abs(noise.abs().mean().item() - 0.05) < 0.001  # E|X| = b
    assert abs(noise.std().item() - 0.05 * math.sqrt(2)) < 0.001  # sd = b * sqrt(2)
    assert abs(noise.mean().item()) < 0.001
    again, _ = defense.transform_update(update, CTX)
    assert torch.equal(again["w"], noisy["w"])
    other, _ = defense.transform_update(update, UpdateContext(3, 1, 1, "fedsgd", 4))
    assert not torch.equal(other["w"], noisy["w"])
    assert defense.attacker_transform(update) is None  # pure noise: nothing deterministic to model


# -- clipping ----------------------------------------------------------------------------------------

def test_clipping_scales_the_global_norm_down_to_c_and_keeps_the_direction() -> None:
    update = fake_update()
    norm = global_norm(update).item()
    defense = make("clipping", max_norm=norm / 4)
    clipped, randomness = defense.transform_update(update, CTX)
    assert randomness == {}
    assert global_norm(clipped).item() == pytest.approx(norm / 4, rel=1e-5)
    for k in update:
        torch.testing.assert_close(clipped[k], update[k] / 4, rtol=1e-5, atol=1e-6)
    inside, _ = make("clipping", max_norm=norm * 2).transform_update(update, CTX)
    assert all(torch.equal(inside[k], update[k]) for k in update)
    attacker = defense.attacker_transform(update)
    assert all(torch.equal(attacker[k], clipped[k]) for k in update)


# -- pruning -----------------------------------------------------------------------------------------

def test_pruning_zeroes_p_percent_of_each_tensor_below_its_percentile() -> None:
    update = fake_update()
    defense = make("pruning", percent=30)
    pruned, _ = defense.transform_update(update, CTX)
    for k, value in update.items():
        thresh = np.percentile(value.abs().numpy(), 30)
        assert percentile(value.abs(), 30).item() == pytest.approx(thresh, rel=1e-5)  # numpy's rule
        zero = pruned[k] == 0
        assert zero.float().mean().item() == pytest.approx(0.30, abs=1.0 / value.numel() + 1e-6)
        assert torch.equal(pruned[k][~zero], value[~zero])  # survivors are untouched
        assert value[zero].abs().max() <= value[~zero].abs().min()
    dummy = {k: v.clone().requires_grad_(True) for k, v in update.items()}
    attacker = defense.attacker_transform(dummy)
    assert all(torch.equal(attacker[k].detach(), pruned[k]) for k in update)
    sum(v.sum() for v in attacker.values()).backward()  # differentiable for gradient matching
    assert torch.equal(dummy["fc.weight"].grad, (pruned["fc.weight"] != 0).float())


# -- quantization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 8])
def test_quantization_uses_at_most_2_to_the_bits_minus_1_values(bits: int) -> None:
    update = fake_update()
    defense = make("quantization", bits=bits)
    quantized, randomness = defense.transform_update(update, CTX)
    assert randomness == {}
    levels = 2 ** (bits - 1) - 1
    for k, value in update.items():
        scale = value.abs().max() / levels
        assert quantized[k].unique().numel() <= 2**bits - 1
        assert (quantized[k] - value).abs().max() <= scale / 2 + 1e-6  # nearest level
        torch.testing.assert_close(quantized[k] / scale, torch.round(quantized[k] / scale))
    dummy = {k: v.clone().requires_grad_(True) for k, v in update.items()}
    attacker = defense.attacker_transform(dummy)
    assert all(torch.equal(attacker[k].detach(), quantized[k]) for k in update)
    attacker["fc.bias"].sum().backward()  # straight-through: d(value)/d(input) = identity
    assert torch.equal(dummy["fc.bias"].grad, torch.ones(50))


def test_stochastic_quantization_is_unbiased_seeded_and_records_its_dither() -> None:
    defense = make("quantization", bits=2, stochastic=True)
    update = {"w": torch.full((100_000,), 0.3), "top": torch.tensor([1.0])}
    update["w"][0] = 1.0  # scale = 1: every entry rounds to 0 or 1, mean 0.3
    out, randomness = defense.transform_update(update, CTX)
    assert set(out["w"].unique().tolist()) == {0.0, 1.0}
    assert out["w"][1:].mean().item() == pytest.approx(0.3, abs=0.01)
    assert randomness["dither/w"].shape == update["w"].shape
    again, _ = defense.transform_update(update, CTX)
    assert torch.equal(again["w"], out["w"])
    assert defense.attacker_transform(update) is None


# -- Soteria -----------------------------------------------------------------------------------------

def test_soteria_scores_match_one_backward_per_feature_and_mask_p_percent_of_active() -> None:
    model = build_model(ModelSpec(name="convnet", width=2), (3, 16, 16), 10, seed=0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    r = model.features(x)
    scores = feature_scores(x, r)
    for i in range(r.shape[1]):
        (jac,) = torch.autograd.grad(r[:, i].sum(), x, retain_graph=True)
        value = r[:, i].detach().abs()
        if not bool((value > 0).any()):
            assert scores[i] == math.inf
            continue
        expect = (jac.flatten(1).norm(dim=1)[value > 0] / value[value > 0]).sum()
        torch.testing.assert_close(scores[i], expect, rtol=1e-4, atol=1e-6)
    mask = soteria_mask(scores, 25)
    active = torch.isfinite(scores)
    assert int((mask == 0).sum()) == round(0.25 * int(active.sum()))
    assert scores[mask == 0].max() <= scores[active & (mask == 1)].min()


def test_soteria_in_a_federation_prunes_only_classifier_columns_and_refuses_fedavg(tiny_raw) -> None:
    clean = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    tiny_raw["defenses"] = [{"name": "soteria", "params": {"percent": 50}}]
    outcome = run_federation(parse_scenario(tiny_raw))
    cap = outcome.capture.updates[0]
    for name, value in clean.update.items():
        if name != "classifier.weight":
            assert torch.equal(cap.update[name], value)
    cols_clean = clean.update["classifier.weight"].abs().sum(0) > 0
    cols_after = cap.update["classifier.weight"].abs().sum(0) > 0
    pruned = cols_clean & ~cols_after
    assert int(pruned.sum()) == round(0.5 * int(cols_clean.sum()))  # of the active features
    kept = cap.update["classifier.weight"][:, cols_after]
    assert torch.equal(kept, clean.update["classifier.weight"][:, cols_after])
    reported = outcome.capture.client_metrics[1][cap.partition_id]["soteria_pruned_fraction"]
    assert reported == pytest.approx(int(pruned.sum()) / len(cols_clean))
    tiny_raw["federation"]["protocol"] = "fedavg"
    with pytest.raises(ScenarioError, match="fedsgd"):
        parse_scenario(tiny_raw)


# -- end to end: what the server captures ---------------------------------------------------------------

@pytest.mark.parametrize(
    "spec", [{"name": "clipping", "params": {"max_norm": 0.05}}, {"name": "pruning", "params": {"percent": 60}},
             {"name": "quantization", "params": {"bits": 3}}], ids=lambda s: s["name"],
)
def test_captured_update_is_the_transformed_clean_update(tiny_raw, spec: dict) -> None:
    clean = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    tiny_raw["defenses"] = [spec]
    defended = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    expect = make(spec["name"], **spec["params"]).attacker_transform(dict(clean.update))
    for name in clean.update:
        torch.testing.assert_close(defended.update[name], expect[name])


def test_laplace_noise_in_a_federation_is_recorded_as_ground_truth(tiny_raw) -> None:
    clean = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    tiny_raw["defenses"] = [{"name": "laplace_noise", "params": {"scale": 0.02}}]
    noisy = run_federation(parse_scenario(tiny_raw)).capture.updates[0]
    for name, value in clean.update.items():
        torch.testing.assert_close(noisy.update[name], value + noisy.truth.extras[f"laplace_noise/noise/{name}"])


# -- privacy: Inverting Gradients against each defense -------------------------------------------------

IG_SEED = 0  # client 0's round-1 image: IG reaches 17.5 dB, 5.1 dB over its flat colour (12.4 dB)
IG_ITERATIONS = 1000  # at 250 no seed 0-5 got more than 2.5 dB over a flat guess (seed 2: 19.8 vs 19.3)


def ig_psnr(defenses: list[dict]) -> tuple[float, float]:
    """(PSNR of IG, 1000 iterations, on client 0's round-1 gradient (batch 1); what the image's best flat
    guess scores through the same PSNR) on cifar10-mini."""
    raw = {
        "name": "ig-vs-defense", "seed": IG_SEED, "device": "cpu",
        "data": {"dataset": "cifar10-mini", "test_fraction": 0.2, "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 16},
        "federation": {"clients": 4, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 1, "lr": 0.1}},
        "backend": {"kind": "inprocess"},
        "defenses": defenses,
        "attacks": [{"name": "inverting_gradients", "rounds": [1], "clients": [0],
                     "budget": {"iterations": IG_ITERATIONS}}],
    }
    result = run_scenario(parse_scenario(raw), write=False)
    (outcome,) = result.outcomes
    assert outcome.failed is None, outcome.failed
    return outcome.metrics["psnr_mean"], trivial_score(outcome.truth)[0]


@pytest.fixture(scope="module")
def baseline_psnr() -> float:
    psnr, guess = ig_psnr([])
    assert psnr >= guess + 3.0  # a drop from a baseline no better than a flat guess would mean nothing
    return psnr  # measured 17.47 dB, the flat guess 12.35 (ConvNet w16, batch 1, 1000 iterations, seed 0)


# PSNR measured at seed 0, 1000 iterations (baseline 17.47 dB; the image's flat mean colour 12.35 dB):
# each of these four leaves the attack below that flat guess. (At 250 iterations, as before, the
# baseline on seed 2 was 19.77 dB against a flat guess of 19.28: its "drops" were from a blind guess.)
# Utility, FedSGD on digits (MLP w4, 4 clients x 32 images, lr 0.3, 100 rounds;
# 0.878 undefended): laplace 0.1 -> 0.847, pruning 99% -> 0.219, 2-bit quantization -> 0.369,
# soteria 10% -> 0.872; at their defaults laplace (0.01), pruning (20%) and quantization (8 bits)
# keep 0.867-0.875 but barely dent the attack. Pruning and quantization stop it only where they cost
# most of the utility; Laplace 0.1 and Soteria cost little at this (toy) scale.
@pytest.mark.parametrize(
    ("spec", "measured", "min_drop"),
    [
        ({"name": "laplace_noise", "params": {"scale": 0.1}}, 10.35, 4.0),
        # ~10 s each: with -m slow (their update transforms are checked fast in test_defense_pairs and below)
        pytest.param({"name": "pruning", "params": {"percent": 99}}, 10.32, 4.0,  # GIFD's 20% leaves 16.73 dB
                     marks=pytest.mark.slow),
        pytest.param({"name": "quantization", "params": {"bits": 2}}, 9.84, 4.0,  # 8 bits leaves 15.76 dB
                     marks=pytest.mark.slow),
        ({"name": "soteria", "params": {}}, 11.04, 4.0),  # default 10% of the fc-input features
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else str(v),
)
def test_defense_lowers_inverting_gradients_psnr(baseline_psnr: float, spec: dict, measured: float,
                                                 min_drop: float) -> None:
    psnr, guess = ig_psnr([spec])
    assert psnr < baseline_psnr - min_drop, f"{psnr:.2f} dB vs {baseline_psnr:.2f} (measured {measured})"
    assert psnr < guess + 1.0  # no better than the flat guess (measured 1.3-2.5 dB below it)


@pytest.mark.slow  # ~9 s; clipping's own effect on the update is checked fast above
def test_clipping_alone_does_not_stop_cosine_gradient_matching(baseline_psnr: float) -> None:
    """Clipping one update rescales it; IG's cosine distance is scale invariant, so PSNR is unchanged
    (17.47 vs 17.62 dB, rounding apart): clipping protects only with noise (DP) or in aggregation."""
    psnr, _ = ig_psnr([{"name": "clipping", "params": {"max_norm": 0.01}}])
    assert abs(psnr - baseline_psnr) < 0.5
