"""MID (Wang et al., AAAI 2021): the VIB head, its loss, its seeded randomness, and attacks against it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedsim.defenses import DEFENSES
from fedsim.defenses.mid import VIBClassifier, kl_divergence, vib_layers
from fedsim.models import MODELS, TEXT_MODELS, build_model
from fedsim.run import run_scenario
from fedsim.scenario import DefenseSpec, ModelSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.training import TrainingJob


def mid(**params):
    return DEFENSES.get("mid").from_spec(DefenseSpec(name="mid", params=params))


def convnet(seed: int = 0) -> torch.nn.Module:
    return build_model(ModelSpec(name="convnet", width=16), (3, 32, 32), 10, seed=seed)


def test_head_has_k_equal_half_d() -> None:
    model = mid().transform_model(convnet())  # d = 4 * 16 * 4 * 4 = 1024
    head = model.classifier
    assert isinstance(head, VIBClassifier) and head.k == 512
    assert (head.encoder.in_features, head.encoder.out_features) == (1024, 1024)  # d -> 2K
    assert (head.decoder.in_features, head.decoder.out_features) == (512, 10)  # K -> classes
    assert mid(bottleneck_dim=64).transform_model(convnet()).classifier.k == 64


@pytest.mark.parametrize("name", [n for n in MODELS if n not in TEXT_MODELS])
def test_any_registered_model_takes_the_head(name: str) -> None:
    model = build_model(ModelSpec(name=name, width=4), (3, 32, 32), 7, seed=0)
    d = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features
    model = mid().transform_model(model)
    (head,) = vib_layers(model)
    assert head.k == d // 2
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_predictions_are_stochastic_but_seeded_and_init_is_reproducible() -> None:
    model = mid().transform_model(convnet()).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.equal(a, b)  # z is sampled in eval mode too: the released model is stochastic
        torch.manual_seed(5)
        c = model(x)
        torch.manual_seed(5)
        assert torch.equal(c, model(x))
    same = mid().transform_model(convnet())
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())
    other = mid().transform_model(convnet(seed=1))
    assert not torch.equal(other.classifier.encoder.weight, model.classifier.encoder.weight)


def test_kl_matches_a_hand_computation() -> None:
    mu = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    sigma = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    # row 1: 1/2 [(0.25 + 1 - 1 - 2 ln 1) + (1 + 0.25 - 1 - 2 ln 0.5)] = 1/2 (0.5 + 1.386294) = 0.943147
    # row 2: N(0, 1) against itself: 0. Batch mean: 0.4715736.
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.4715736, abs=1e-5)


def test_loss_is_ce_plus_beta_kl_and_plain_ce_at_beta_zero() -> None:
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for beta in (0.0, 0.5):
        model = mid(beta=beta).transform_model(convnet())
        job = mid(beta=beta).wrap_training(TrainingJob(model))
        torch.manual_seed(0)
        loss = job.loss_fn(model(x), y)
        model.classifier.keep_stats = True
        torch.manual_seed(0)
        logits = model(x)
        expect = F.cross_entropy(logits, y)
        if beta:
            expect = expect + beta * kl_divergence(model.classifier.last_mu, model.classifier.last_sigma)
        assert loss.item() == expect.item()


def test_mid_federation_is_reproducible_and_attackable(tiny_raw) -> None:
    tiny_raw["defenses"] = [{"name": "mid", "params": {"beta": 0.01}}]
    scenario = parse_scenario(tiny_raw)
    torch.manual_seed(1)
    a = run_federation(scenario)
    torch.manual_seed(2)  # the server's evaluation is seeded per round, whatever the global RNG holds
    b = run_federation(scenario)
    assert [h.get("test_loss") for h in a.history] == [h.get("test_loss") for h in b.history]
    ua, ub = a.capture.updates[0].update, b.capture.updates[0].update
    assert set(ua) >= {"classifier.encoder.weight", "classifier.decoder.weight"}
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    task = setup_for(scenario).task
    assert task.model_transforms == ({"name": "mid", "bottleneck_dim": None},)  # beta is no architecture
    (outcome,) = run_scenario(scenario, write=False).outcomes  # the attack rebuilds the MID model
    assert outcome.failed is None


def ig_psnr(defenses: list[dict]) -> float:
    """Inverting Gradients (250 iterations) on client 0's round-1 gradient, cifar10-mini, seed 2."""
    raw = {
        "name": "ig-vs-mid", "seed": 2, "device": "cpu",
        "data": {"dataset": "cifar10-mini", "test_fraction": 0.2, "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 16},
        "federation": {"clients": 4, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 1, "lr": 0.1}},
        "backend": {"kind": "inprocess"},
        "defenses": defenses,
        "attacks": [{"name": "inverting_gradients", "rounds": [1], "clients": [0], "budget": {"iterations": 250}}],
    }
    torch.manual_seed(0)  # the attacker's forward passes sample the bottleneck from the global RNG
    (outcome,) = run_scenario(parse_scenario(raw), write=False).outcomes
    assert outcome.failed is None, outcome.failed
    return outcome.metrics["psnr_mean"]


def test_mid_lowers_inverting_gradients_psnr() -> None:
    """Measured: 19.77 dB undefended; MID beta = 0.1: 15.60 dB; the default beta = 0.01 gives 19.24 dB
    and beta = 0 18.68 dB: in round 1 sigma = softplus(-5) ~ 0.007, so the bottleneck is nearly
    deterministic, and the drop at larger beta comes from the KL term's gradient, which IG (plain CE)
    does not model. Utility (digits, MLP w4, lr 0.3, 100 rounds of FedSGD): 0.878 undefended, 0.756
    at beta = 0.01; beta = 0.1 diverges at that learning rate (the official code trains at 5e-3..1e-2)."""
    baseline, defended = ig_psnr([]), ig_psnr([{"name": "mid", "params": {"beta": 0.1}}])
    assert defended < baseline - 1.2, (defended, baseline)
