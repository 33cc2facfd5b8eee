"""Robbing the Fed (attacks/robbing_the_fed.py, attacks/imprint_block.py) and the analytic first-layer attack
(attacks/analytic_fc.py), without a federation: the manipulated model is built from ``manipulate()`` exactly as a
client builds it (``apply_architecture`` + the sent state), the client's gradient or local steps are computed here
on a real batch, and ``reconstruct`` reads them back. PSNR is computed here (10 log10(1 / mse), one-to-one matched
by scipy's Hungarian solver), never by fedsim's scorer; the trivial attacker is the batch's mean image."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_update
from rtf_support import client_model, client_update, observed, psnr_matched, rtf_attack, setup, view_for

from fedsim.attacks.analytic_fc import AnalyticFC
from fedsim.attacks.robbing_the_fed import RobbingTheFed
from fedsim.errors import ScenarioError
from fedsim.models.manipulation import agreed_part
from fedsim.scenario import Budget, Knowledge, ModelSpec, parse_scenario
from fedsim.threat import ClientUpdate

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios" / "attacks"


def _trivial_db(x: torch.Tensor) -> float:
    """Mean PSNR of the batch's mean image against every image of the batch."""
    return float(psnr_matched(x.mean(0, keepdim=True).expand_as(x).clone(), x).mean())


def _run(dataset: str, batch: int, protocol: str = "fedsgd", steps: int = 1, **params):
    bundle, _, task, net = setup(dataset, protocol=protocol)
    x, y = bundle.train_x[:batch], bundle.train_y[:batch]
    attack = rtf_attack(**params)
    sent = attack.manipulate(view_for(task, net, bundle.test_x))
    rec = attack.reconstruct(observed(task, sent, client_update(task, sent, x, y, steps=steps), batch))
    return rec, x


@pytest.mark.parametrize(("dataset", "batch", "least"), [("mnist-5k", 64, 0.7), ("cifar10-mini", 16, 0.8)])
def test_imprint_recovers_most_of_a_fedsgd_batch_exactly(dataset, batch, least) -> None:
    # measured (seed 0, 256 bins): MNIST 48/64 = 0.75 above 40 dB (52 returned), CIFAR 14/16 = 0.875 (4 auxiliary
    # images only: a Gaussian fitted to their measurements)
    rec, x = _run(dataset, batch)
    assert rec.failed is None and rec.labels is None
    psnr = psnr_matched(rec.images, x)
    assert float((psnr > 40).double().mean()) >= least, psnr
    assert _trivial_db(x) < 15 and float((psnr_matched(x.mean(0, keepdim=True).expand_as(x), x) > 40).sum()) == 0
    # only recovered images come back, never blanks; at most the batch
    assert rec.images.shape[0] <= batch and bool((rec.images.flatten(1).amax(1) > 0).all())
    assert rec.stats["recovered"] == rec.images.shape[0]


def test_prior_thresholds_without_data_recover_fewer_but_many() -> None:
    # a unit Gaussian prior of the random measurement (threat model F): measured 0.73 of 64 above 40 dB
    # (as many as with the 1000 auxiliary digits; laplace: 0.80)
    rec, x = _run("mnist-5k", 64, thresholds="prior")
    assert float((psnr_matched(rec.images, x) > 40).double().mean()) >= 0.45


@pytest.mark.parametrize(("steps", "least"), [(2, 0.6), (4, 0.5)])
def test_fedavg_local_steps_still_recover_a_stated_fraction(steps, least) -> None:
    # FedAvg, lr 0.1, `steps` SGD steps on the batch of 64: measured 0.67 (2 steps) and 0.58 (4 steps) above 40 dB
    rec, x = _run("mnist-5k", 64, protocol="fedavg", steps=steps)
    assert float((psnr_matched(rec.images, x) > 40).double().mean()) >= least


def _quantized(update: dict[str, torch.Tensor], gen: torch.Generator, clip: float = 8.0,
               levels: int = 2**22) -> dict[str, torch.Tensor]:
    """SecAgg+'s quantization (defenses/secagg.py defaults): clip to +-clip, stochastic rounding on ``levels``."""
    step = 2 * clip / levels
    out = {}
    for k, v in update.items():
        v = v.double().clamp(-clip, clip) / step
        out[k] = ((v.floor() + (torch.rand(v.shape, generator=gen, dtype=torch.float64) < v - v.floor())) * step)
    return out


def test_secagg_aggregate_of_four_clients_recovers_a_stated_fraction() -> None:
    # 4 clients x 16 digits, each sent the block (to_all), each update quantized as SecAgg+ does, summed: the
    # server sees only the aggregate. gain 100 / scale 0.001 keeps the block's gradient far above the quantization
    # step (4e-6); measured 0.64 of the 64 digits above 40 dB (the default gain 1 drowns in quantization: 0)
    bundle, _, task, net = setup("mnist-5k")
    attack = rtf_attack(gain=100.0, scale=0.001, to_all=True)
    sent = attack.manipulate(view_for(task, net, bundle.test_x))
    assert sent.to_all
    gen = torch.Generator().manual_seed(0)
    total: dict[str, torch.Tensor] = {}
    for c in range(4):
        x, y = bundle.train_x[16 * c:16 * (c + 1)], bundle.train_y[16 * c:16 * (c + 1)]
        part = _quantized(client_update(task, sent, x, y, weight=0.25), gen)
        total = {k: total.get(k, 0) + v for k, v in part.items()}
    rec = attack.reconstruct(observed(task, sent, {k: v.float() for k, v in total.items()}, 64))
    frac = float((psnr_matched(rec.images, bundle.train_x[:64]) > 40).double().mean())
    assert frac >= 0.6, frac


def test_manipulated_model_keeps_the_agreed_model_and_travels() -> None:
    bundle, _, task, net = setup("mnist-5k")
    honest = view_for(task, net, bundle.test_x)
    sent = rtf_attack().manipulate(honest)
    assert sent.architecture[0]["name"] == "imprint"
    assert {k for k in sent.state if k.startswith("imprint.")} == {
        "imprint.linear0.weight", "imprint.linear0.bias", "imprint.linear1.weight"}
    kept = agreed_part(sent.state, sent.architecture)
    assert kept.keys() == honest.global_state.keys()
    assert all(torch.equal(kept[k], honest.global_state[k]) for k in kept)
    model = client_model(task, sent)
    x = bundle.train_x[:4]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the pre-hook survives both
        assert torch.allclose(clone(x), model(x))
    # deterministic: the same seed sends the same model, another seed another direction
    again = rtf_attack().manipulate(honest)
    assert all(torch.equal(again.state[k], sent.state[k]) for k in sent.state)
    other = rtf_attack(seed=1).manipulate(honest)
    assert not torch.equal(other.state["imprint.linear0.weight"], sent.state["imprint.linear0.weight"])


def test_reconstruct_fails_with_a_reason_without_an_imprint_block() -> None:
    bundle, _, task, net = setup("mnist-5k")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    update = ClientUpdate(1, 0, task, state, {k: torch.ones_like(v) for k, v in state.items()}, 4)
    rec = rtf_attack().reconstruct(update)
    assert rec.failed and "imprint" in rec.failed


def test_threat_model_letter_follows_the_thresholds() -> None:
    k = Knowledge(local_hparams=True, auxiliary_data=True)
    assert RobbingTheFed.threat_model_for(RobbingTheFed.Params(thresholds="auxiliary"), k) == "G"
    assert RobbingTheFed.threat_model_for(RobbingTheFed.Params(thresholds="prior"), k) == "F"
    assert RobbingTheFed.changes_architecture and RobbingTheFed.min_iterations == 0


# --- analytic first-layer attack -----------------------------------------------------------------


def _analytic(batch: int):
    bundle, _, task, net = setup("mnist-5k", model="fc10")
    x, y = bundle.train_x[:batch], bundle.train_y[:batch]
    update = make_update(net, ModelSpec(name="fc10"), x, y, bundle)
    attack = AnalyticFC(AnalyticFC.Params(), Knowledge(), Budget(iterations=0), torch.device("cpu"), 0)
    return attack.reconstruct(update), x


def test_analytic_fc_is_exact_at_batch_one() -> None:
    rec, x = _analytic(1)
    assert rec.failed is None and rec.images.shape == x.shape
    assert float(psnr_matched(rec.images, x)[0]) > 60


def test_analytic_fc_degrades_to_mixtures_at_batch_four() -> None:
    # fc10's softplus passes every example's gradient through every row: each of the 10 rows is a mixture of all
    # 4 digits, so nothing comes back alone. Measured: 18.4, 10.9, 10.3, 9.6 dB (mean 12.3; the batch's mean image
    # scores 13.0): no better than the trivial attacker
    rec, x = _analytic(4)
    psnr = psnr_matched(rec.images, x)
    assert rec.images.shape[0] == 4 and rec.stats["update_rank"] == 4 and rec.stats["exact"] == 0
    assert float(psnr.max()) < 25 and float(psnr.mean()) < _trivial_db(x) + 3


def test_analytic_fc_that_isolates_nothing_returns_an_empty_reconstruction_not_a_failure() -> None:
    """A zero first-layer bias gradient (nothing to divide by): the attack ran and recovered nothing, which the
    scorer counts as 0 of the batch (Reconstruction's rule); a failure would drop it from every table."""
    bundle, _, task, net = setup("mnist-5k", model="fc10")
    x, y = bundle.train_x[:2], bundle.train_y[:2]
    update = make_update(net, ModelSpec(name="fc10"), x, y, bundle)
    first = next(k[: -len(".bias")] for k in update.update if k.endswith(".bias"))  # fc10's first Linear layer
    zeroed = {k: torch.zeros_like(v) if k.startswith(first + ".") else v for k, v in update.update.items()}
    update = ClientUpdate(update.round, update.partition_id, update.task, update.global_state, zeroed,
                          update.num_examples)
    attack = AnalyticFC(AnalyticFC.Params(), Knowledge(), Budget(iterations=0), torch.device("cpu"), 0)
    rec = attack.reconstruct(update)
    assert rec.failed is None and rec.images.shape == (0, *x.shape[1:]) and rec.labels is None
    assert "zero" in rec.stats["nothing_isolated"]


def _raw(name: str) -> dict:
    raw = yaml.safe_load((SCENARIOS / name).read_text())
    raw["backend"] = {"kind": "inprocess"}
    return raw


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_analytic_fc_refuses_a_model_without_a_biased_linear_first_layer(model) -> None:
    raw = _raw("analytic_fc.yaml")
    raw["model"] = {"name": model}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert info.value.path == "model.name" and ("bias" in info.value.reason or "Conv2d" in info.value.reason)


def test_examples_validate_and_need_their_grants() -> None:
    parse_scenario(_raw("analytic_fc.yaml"))
    parse_scenario(_raw("robbing_the_fed.yaml"))
    raw = _raw("robbing_the_fed.yaml")
    raw["server"] = {"role": "honest_but_curious"}
    with pytest.raises(Exception, match="server.role"):
        parse_scenario(raw)


def test_dp_noise_on_the_update_leaves_nothing_above_40_db() -> None:
    # DP-SGD's noise at sigma 1, C 1 on the mean gradient of 64 (std 1/64 per entry, clipping left out): every bin
    # looks non-empty and every ratio is noise; the attack says so instead of returning noise as images, and it
    # returns the empty reconstruction (it ran and isolated nothing: a measured 0 of 64, not a failed attack)
    bundle, _, task, net = setup("mnist-5k")
    x, y = bundle.train_x[:64], bundle.train_y[:64]
    attack = rtf_attack()
    sent = attack.manipulate(view_for(task, net, bundle.test_x))
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + torch.randn(v.shape, generator=gen) / 64 for k, v in client_update(task, sent, x, y).items()}
    rec = attack.reconstruct(observed(task, sent, noisy, 64))
    assert rec.failed is None and tuple(rec.images.shape) == (0, *x.shape[1:])
    assert "none isolated an input" in rec.stats["nothing_isolated"] and "outside the pixel box" in \
        rec.stats["nothing_isolated"]
    assert rec.stats["bins_with_inputs"] == 256
