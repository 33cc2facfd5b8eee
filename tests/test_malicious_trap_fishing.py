"""Trap weights and class fishing without a federation: the manipulated model comes from ``manipulate()``, the
client's FedSGD gradient on a real batch is computed here (``helpers.make_update``), then ``reconstruct`` runs.

PSNR is computed here from the pixels (10 log10(1 / MSE) against each true image), not by fedsim's scorer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import make_update
from rtf_support import psnr_matched

from fedsim.attacks.fishing import Fishing
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.attacks.trap_weights import TrapWeights
from fedsim.data import load_dataset
from fedsim.errors import ScenarioError
from fedsim.models import build_model
from fedsim.scenario import AttackSpec, Budget, DataSpec, Knowledge, ModelSpec
from fedsim.threat import ManipulationView, ModelFacts

CPU = torch.device("cpu")
SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios" / "attacks"


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataSpec(dataset="mnist-5k"))


@pytest.fixture(scope="module")
def cifar():
    return load_dataset(DataSpec(dataset="cifar10-mini"))


def closest_psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per true image (B,), the PSNR (dB) of the reconstruction closest to it (pixel MSE)."""
    mse = ((images.reshape(len(images), 1, -1) - truth.reshape(1, len(truth), -1)) ** 2).mean(-1)
    return -10 * torch.log10(mse.min(dim=0).values.clamp_min(1e-12))


def attacked(attack, spec: ModelSpec, bundle, x, y, **view):
    """(honest update, update of the model ``attack.manipulate`` sent) for batch (x, y), model seed 0."""
    model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=0)
    honest = make_update(model, spec, x, y, bundle)
    sent = attack.manipulate(ManipulationView(1, honest.task, honest.global_state, (0,), **view))
    assert sent.architecture == () and set(sent.state) == set(honest.global_state)  # weights only
    model.load_state_dict(dict(sent.state))
    return honest, make_update(model, spec, x, y, bundle)


def trap(calibrate: str = "auxiliary", seed: int = 0) -> TrapWeights:
    return TrapWeights(TrapWeights.Params(calibrate=calibrate), Knowledge(auxiliary_data=True),
                       Budget(iterations=1), CPU, seed)


# --- trap weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "least"), [(32, 0.75), (64, 0.6)])
def test_trap_weights_recover_most_of_an_mnist_batch_exactly(mnist, size, least) -> None:
    """MLP (3 x 512 ReLU, first layer without bias: a constant MNIST pixel stands in), auxiliary calibration.
    Measured: 30 of 32 (0.94) and 51 of 64 (0.80) true images with a reconstruction above 40 dB (most at float
    precision, > 100 dB). A trivial attacker, the batch's mean image, recovers none above 40 dB (it scores
    ~12-15 dB), so the asserted fraction is also the margin over it."""
    x, y = mnist.train_x[:size], mnist.train_y[:size]
    attack = trap()
    _, update = attacked(attack, ModelSpec(name="mlp", activation="relu"), mnist, x, y,
                         hyperparams={"batch_size": size}, auxiliary=mnist.test_x)
    rec = attack.reconstruct(update)
    assert rec.failed is None
    assert rec.images.shape[1:] == x.shape[1:] and len(rec.images) <= size  # never a surplus
    frac = float((psnr_matched(rec.images, x) > 40).float().mean())  # one-to-one, as the recovery share
    trivial = float((psnr_matched(x.mean(dim=0, keepdim=True), x) > 40).float().mean())
    assert trivial == 0.0
    assert frac >= least, f"only {frac:.2f} of {size} above 40 dB"


def test_trap_weights_data_free_variant_is_exact_on_a_layer_with_bias(mnist) -> None:
    """fc10 with ReLU (first layer WITH bias, 10 neurons), calibrate: none (letter F, the paper's scaled negative
    weights): every returned image is an exact copy of a batch image (> 60 dB); measured 3 of a batch of 8."""
    x, y = mnist.train_x[:8], mnist.train_y[:8]
    attack = trap("none")
    _, update = attacked(attack, ModelSpec(name="fc10", activation="relu"), mnist, x, y)
    rec = attack.reconstruct(update)
    assert rec.failed is None and len(rec.images) >= 2
    per_image = closest_psnr(x, rec.images)  # each reconstruction against its closest true image
    assert bool((per_image > 60).all()), per_image


def test_trap_weights_keep_the_honest_layer_norm(mnist) -> None:
    """match_norm (default): the trap layer has the honest first layer's Frobenius norm (a weight-statistics check
    sees a norm ratio of 1; measured through the federation: model_check ratio 1.00, not flagged), and the
    recovery is still exact; without it the norm is ~70x the honest one (model_check flags it)."""
    spec = ModelSpec(name="mlp", activation="relu")
    x, y = mnist.train_x[:16], mnist.train_y[:16]
    for match, check in ((True, lambda r: abs(r - 1) < 1e-4), (False, lambda r: r > 10)):
        attack = TrapWeights(TrapWeights.Params(match_norm=match), Knowledge(auxiliary_data=True),
                             Budget(iterations=1), CPU, 0)
        honest, update = attacked(attack, spec, mnist, x, y, hyperparams={"batch_size": 16}, auxiliary=mnist.test_x)
        key = "features.1.weight"
        ratio = float(update.global_state[key].norm() / honest.global_state[key].norm())
        assert check(ratio), (match, ratio)
        rec = attack.reconstruct(update)
        assert float((psnr_matched(rec.images, x) > 40).float().mean()) >= 0.75


def test_trap_weights_letters_and_refusals(mnist) -> None:
    params = TrapWeights.Params
    assert TrapWeights.threat_model_for(params(), Knowledge()) == "G"
    assert TrapWeights.threat_model_for(params(calibrate="none"), Knowledge()) == "F"
    spec = AttackSpec(name="trap_weights", params={"calibrate": "none"})
    for model_spec, path in ((ModelSpec(name="convnet"), "model.name"), (ModelSpec(name="fc10"), "model.name"),
                             (ModelSpec(name="mlp", activation="relu"), "params.calibrate")):
        honest = make_update(build_model(model_spec, mnist.input_shape, 10), model_spec, mnist.train_x[:1],
                             mnist.train_y[:1], mnist)
        facts = ModelFacts(honest.task, build_model(model_spec, mnist.input_shape, 10), {0: 1})
        with pytest.raises(ScenarioError) as err:
            TrapWeights.check_model(None, spec, facts)
        assert err.value.path == path


# --- fishing -----------------------------------------------------------------------------------------------


# Margins in dB, measured with benchmarks/malicious_vs_ig.py and the tests below (convnet width 16, TV 0.05), every
# PSNR against the TARGET image; "trivial" is the best of flat gray, the batch mean and the test-set mean on it.
# 300 iterations, fishing over trivial (model seeds 0/1/2): class 5 +5.0/+3.7/+4.4, class 7 +2.6/+2.2/+1.7.
MARGIN_TRIVIAL_300 = 1.0
# 1000 iterations, fishing minus IG (labels known, same TV): class 5 +4.2/+2.3/+1.7, class 7 +3.7/+1.2/-0.4, i.e.
# 2.1 +- 1.7 dB: fishing beats IG in 5 of 6 cases, NOT in every one. The slow test pins seed 0, class 5: 20.6 vs
# IG 17.0 dB (+3.6; the benchmark's permuted batch order gives IG 16.4), trivial 12.7 dB.
# With 4 fishing restarts (equal CPU time: still less than IG's one run) the benchmark's six margins are all
# positive: 2.8 +- 1.3 dB, smallest +0.9 (class 7, seed 2).
MARGIN_IG_1000 = 2.0
# The shipped fishing.yaml at 300 iterations through the federation (its own model seed 0): 16.9 dB on the target
# image against the best trivial 12.7 dB (+4.2).
MARGIN_FEDERATION = 2.0


def fishing(target: int, iterations: int = 1, seed: int = 0) -> Fishing:
    return Fishing(Fishing.Params(target_class=target), Knowledge(), Budget(iterations=iterations, restarts=1),
                   CPU, seed)


def test_fishing_isolates_the_target_class_gradient(cifar) -> None:
    """The manipulated gradient of the feature layers equals (in direction) the gradient of the target class's
    examples alone, computed here on the honest-but-manipulated model from those examples only."""
    x, y = cifar.train_x[:16], cifar.train_y[:16]
    target = int(y[0])
    spec = ModelSpec(name="convnet", width=8)
    attack = fishing(target)
    _, update = attacked(attack, spec, cifar, x, y)
    model = build_model(spec, cifar.input_shape, cifar.num_classes)
    model.load_state_dict(dict(update.global_state))
    alone = make_update(model, spec, x[y == target], y[y == target], cifar)
    names = [n for n in update.update if not n.startswith("classifier")]
    got = torch.cat([update.update[n].flatten() for n in names])
    want = torch.cat([alone.update[n].flatten() for n in names])
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) > 0.9999
    rec = attack.reconstruct(update)
    assert rec.failed is None and rec.stats["class_count"] == int((y == target).sum())
    assert rec.labels.tolist() == [target] * int((y == target).sum())


def test_fishing_returns_nothing_when_the_class_is_absent(cifar) -> None:
    """The attack ran and isolated nothing: an empty (0, C, H, W) reconstruction, not a failure, and the reason."""
    x, y = cifar.train_x[:8], cifar.train_y[:8]
    absent = next(c for c in range(10) if c not in y.tolist())
    attack = fishing(absent)
    _, update = attacked(attack, ModelSpec(name="convnet", width=4), cifar, x, y)
    rec = attack.reconstruct(update)
    assert rec.failed is None
    assert tuple(rec.images.shape) == (0, *x.shape[1:]) and len(rec.labels) == 0
    assert rec.stats["class_count"] == 0 and "not in the batch" in rec.stats["nothing_isolated"]


def target_psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the target images of the PSNR (dB) of the reconstruction closest to each (pixel MSE); no image
    (nothing isolated) scores the blind gray guess."""
    if len(images) == 0:
        images = torch.full_like(targets[:1], 0.5)
    return float(closest_psnr(images, targets).mean())


def trivial_psnr(x: torch.Tensor, targets: torch.Tensor, test_x: torch.Tensor) -> float:
    """The best trivial attacker on the target images: flat gray, the batch's mean image or the test-set mean."""
    guesses = (torch.full_like(x[:1], 0.5), x.mean(dim=0, keepdim=True), test_x.mean(dim=0, keepdim=True))
    return max(target_psnr(g, targets) for g in guesses)


def _fish_on_target(cifar, target: int, iterations: int, seed: int = 0, with_ig: bool = False):
    """(fishing, IG or None, best trivial attacker), each the PSNR against the TARGET image(s): the batch's true
    images of ``target``, found here from the dataset labels. Batch: cifar10-mini's 16 training images; convnet
    width 16 (model seed ``seed``); IG on the honest update of the same batch, same budget and TV weight, labels
    known (its best case; fishing reads its one label and the count off the bias gradient)."""
    x, y = cifar.train_x[:16], cifar.train_y[:16]
    truth = x[y == target]
    spec = ModelSpec(name="convnet", width=16)
    attack = fishing(target, iterations, seed)
    model = build_model(spec, cifar.input_shape, cifar.num_classes, seed=seed)
    honest = make_update(model, spec, x, y, cifar)
    model.load_state_dict(dict(attack.manipulate(ManipulationView(1, honest.task, honest.global_state, (0,))).state))
    fished = target_psnr(attack.reconstruct(make_update(model, spec, x, y, cifar)).images, truth)
    base = None
    if with_ig:
        ig = InvertingGradients(InvertingGradients.Params(tv=attack.params.tv), Knowledge(labels="known"),
                                Budget(iterations=iterations, restarts=1), CPU, seed)
        base = target_psnr(ig.reconstruct(dataclasses.replace(honest)).images, truth)
    return fished, base, trivial_psnr(x, truth, cifar.test_x)


@pytest.mark.parametrize("target", [5, 7])  # the two classes cifar10-mini's 16 training images hold once
def test_fishing_beats_a_trivial_attacker_on_the_target_image(cifar, target) -> None:
    """300 iterations (~4 s). MARGIN_TRIVIAL_300 below: measured and asserted margins over the best of gray, the
    batch mean and the test-set mean, scored on the target image."""
    fished, _, trivial = _fish_on_target(cifar, target, iterations=300)
    print(f"target {target}: fished {fished:.2f} dB, best trivial {trivial:.2f} dB")
    assert fished >= trivial + MARGIN_TRIVIAL_300, (fished, trivial)


@pytest.mark.slow
def test_fishing_against_honest_ig_on_the_target_image(cifar) -> None:
    """1000 iterations each (~70 s), target class 5, model seed 0. See SLOW_IG below for what is measured and
    asserted (benchmarks/malicious_vs_ig.py gives the spread over seeds and targets)."""
    fished, base, trivial = _fish_on_target(cifar, 5, iterations=1000, with_ig=True)
    print(f"fished {fished:.2f} dB, IG {base:.2f} dB, best trivial {trivial:.2f} dB on the target image")
    assert fished >= trivial + 3.0, (fished, trivial)
    assert fished >= base + MARGIN_IG_1000, (fished, base)


# --- through the federation (fedsim run machinery, in-process backend, server.role: malicious) ----------------


def _run_example(name: str, tmp_path, **budget):
    import yaml

    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    raw = yaml.safe_load((SCENARIOS / name).read_text())
    raw["backend"] = {"kind": "inprocess"}
    raw["attacks"][0]["budget"].update(budget)
    (outcome,) = run_scenario(parse_scenario(raw), tmp_path / "run").outcomes
    assert outcome.failed is None
    return outcome


def test_trap_weights_through_the_federation(tmp_path) -> None:
    """The shipped example: client 0's batch of 64 digits. Measured (seed 0): 49 of 64 above 40 dB (51 returned)."""
    outcome = _run_example("trap_weights.yaml", tmp_path)
    assert outcome.threat_model == "G" and outcome.truth.shape[0] == 64
    psnr = psnr_matched(outcome.reconstruction, outcome.truth)
    assert float((psnr > 40).float().mean()) >= 0.65
    assert float(closest_psnr(outcome.truth.mean(dim=0, keepdim=True), outcome.truth).max()) < 40  # trivial


def test_fishing_through_the_federation(cifar, tmp_path) -> None:
    """The shipped example at 300 iterations: one fished image, labelled with the target class; the target image
    (the truth's one image of class 5, found by pixel equality in the dataset, independently of fedsim's scorer) is
    the true image closest to it, and the fished image beats the best trivial attacker on it (MARGIN_FEDERATION)."""
    outcome = _run_example("fishing.yaml", tmp_path, iterations=300)
    assert outcome.threat_model == "F" and outcome.reconstruction.shape[0] == 1
    assert outcome.labels.tolist() == [5] and outcome.stats["class_count"] == 1
    flat = cifar.train_x.reshape(len(cifar.train_x), -1)
    truth_labels = [int(cifar.train_y[(flat == t.reshape(1, -1)).all(dim=1)][0]) for t in outcome.truth]
    is_target = torch.tensor(truth_labels) == 5
    assert int(is_target.sum()) == 1
    nearest = int(closest_psnr(outcome.reconstruction, outcome.truth).argmax())  # truth index closest to it
    assert bool(is_target[nearest])
    truth = outcome.truth[is_target]
    fished = target_psnr(outcome.reconstruction, truth)
    trivial = trivial_psnr(outcome.truth, truth, cifar.test_x)
    print(f"fished {fished:.2f} dB, best trivial {trivial:.2f} dB on the target image")
    assert fished >= trivial + MARGIN_FEDERATION, (fished, trivial)
