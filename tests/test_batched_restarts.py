"""Batched restarts: K trials of Inverting Gradients as one vmapped computation equal K sequential ones.

Equivalence is checked trial by trial, with tolerances taken from the computation itself: the same
sequential trials run in float64 show how far float32 rounding alone moves the result, and the
batched float32 run may differ from the sequential one by about that much, on any machine. With the
plain (unsigned) Adam the two float32 runs agree to 4e-6 - 9e-5 per pixel here.
With the default signed Adam, ``sign()`` turns 1-ulp differences between the vmapped and the plain
kernels into +-lr steps, so single pixels drift apart (measured up to 0.15 after 100 steps at seed 0,
and restart 0 instead of 3 chosen at seed 3 with grad losses 0.05635 vs 0.05659), while the quality
is the same: the returned PSNR differs by <= 0.03 dB.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_inverting_gradients import attack, convnet_update, make_update, psnr

import fedsim.attacks.inverting_gradients as ig
from fedsim.attacks.batched import BatchingUnsupported, optimize_trials, parameter_gradient
from fedsim.data import load_dataset
from fedsim.models import build_model
from fedsim.scenario import DataSpec, ModelSpec


@pytest.fixture(scope="module")
def cifar():
    return load_dataset(DataSpec(dataset="cifar10-mini"))


def test_optimize_trials_is_k_independent_adams() -> None:
    """Own init, Adam moments, sign, box and step schedule per trial: bitwise what K runs give."""
    gen = torch.Generator().manual_seed(0)
    x0, goal = torch.randn(3, 2, 4, 5, 5, generator=gen), torch.randn(2, 4, 5, 5, generator=gen)
    box = (torch.full((1, 4, 1, 1), -0.8), torch.full((1, 4, 1, 1), 0.9))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (x - goal).pow(2).sum() + (x[..., 1:] - x[..., :-1]).abs().mean()

    for signed in (True, False):
        kw = {"iterations": 40, "lr": 0.1, "signed": signed, "box": box}
        result = optimize_trials(loss, x0, **kw)
        assert result.iterations == (40, 40, 40) and result.stopped == (None, None, None)
        for k in range(3):
            torch.testing.assert_close(result.x[k], ig.optimize_inputs(loss, x0[k], **kw).x, rtol=0, atol=1e-6)


def test_a_trial_that_turns_nan_is_frozen_while_the_others_go_on() -> None:
    x0 = torch.stack([torch.zeros(1, 2), torch.full((1, 2), 5.0), torch.ones(1, 2)])

    def loss(x: torch.Tensor) -> torch.Tensor:  # NaN once the first coordinate exceeds 4
        return torch.where(x[0, 0] > 4, torch.nan, 1.0) * (x - 2).pow(2).sum()

    result = optimize_trials(loss, x0, iterations=30, lr=0.1, signed=False)
    assert result.stopped == (None, "non-finite loss", None) and result.iterations == (30, 0, 30)
    assert torch.equal(result.x[1], x0[1])
    torch.testing.assert_close(result.x[0], ig.optimize_inputs(loss, x0[0], iterations=30, lr=0.1, signed=False).x)


def test_a_loss_vmap_cannot_batch_raises_batching_unsupported() -> None:
    with pytest.raises(BatchingUnsupported):
        optimize_trials(lambda x: x.sum() * float(x.sum().item() > 0), torch.zeros(2, 3), iterations=3, lr=0.1)



def _tv_prior(x: torch.Tensor) -> torch.Tensor:
    from fedsim.attacks.regularizers import total_variation

    return 0.01 * total_variation(x)


def _sequential_trial(net, goal, labels, bounds, start, options) -> torch.Tensor:  # noqa: ANN001
    """One IG trial run on its own (the sequential reference the batched trials are compared with)."""
    from fedsim.attacks.inverting_gradients import gradient_distance
    from fedsim.attacks.objectives import cosine

    def loss(x: torch.Tensor) -> torch.Tensor:
        return gradient_distance(net, x, labels, goal, cosine) + _tv_prior(x)

    return ig.optimize_inputs(loss, start, box=bounds, **options).x

@pytest.mark.parametrize(("name", "norm", "batch", "iterations"),
                         [("convnet", "none", 2, 40), ("convnet", "batch", 2, 40), ("lenet", "none", 1, 20)])
def test_batched_equals_sequential_up_to_float32_rounding_unsigned(cifar, name, norm, batch, iterations) -> None:
    """B >= 1 and train-mode BatchNorm (each trial normalized by its own batch) included, unsigned Adam.

    "Equal up to rounding" with a tolerance taken from the computation, not from one machine's kernels
    (a fixed 1e-4 failed where another machine's kernels gave 2e-4): the same sequential optimisation in
    float64 is the exact reference, and every batched float32 trial may be no further from its
    sequential float32 twin than twice the distance float32 rounding already puts the sequential run
    from float64 (both are float32 approximations of it), plus a floor of 64 float32 ulps of the input
    range. Measured here: batched vs sequential 4e-6 - 9e-5, float32 vs float64 4e-3 - 9e-3 after 20-40
    steps (Adam divides by sqrt(v), which amplifies rounding). Another trial's inputs or shared Adam
    moments move a trial by O(0.1-1).
    """
    from fedsim.attacks.inverting_gradients import pixel_box
    from fedsim.attacks.objectives import cosine
    from fedsim.attacks.victim import target_gradient, victim_model

    spec = ModelSpec(name=name, width=8, norm=norm)
    model = build_model(spec, cifar.input_shape, cifar.num_classes, seed=1)
    upd = make_update(model, spec, cifar.train_x[:batch], cifar.train_y[:batch], cifar)
    victim = victim_model(upd)
    target, labels = target_gradient(upd, victim), cifar.train_y[:batch]
    box = pixel_box(cifar.mean, cifar.std, torch.device("cpu"))
    x0 = torch.randn((3, batch, *cifar.input_shape), generator=torch.Generator().manual_seed(5))
    options = {"iterations": iterations, "lr": 0.1, "signed": False, "decay": "step"}

    prior = _tv_prior

    def sequential(net, goal, bounds, start):
        return _sequential_trial(net, goal, labels, bounds, start, options)

    seq32 = [sequential(victim, target, box, x0[k]) for k in range(3)]
    bat32 = optimize_trials(ig.matching_loss(victim, labels, target, cosine, None, prior), x0, box=box, **options).x
    net64 = copy.deepcopy(victim).double()
    seq64 = [sequential(net64, [t.double() for t in target], tuple(b.double() for b in box), x0[k].double())
             for k in range(3)]
    rounding = max(float((a.double() - r).abs().max()) for a, r in zip(seq32, seq64, strict=True))
    floor = 64 * torch.finfo(torch.float32).eps * float(box[1].max() - box[0].min())
    for a, b in zip(seq32, bat32, strict=True):
        assert float((a - b).abs().max()) <= 2 * rounding + floor, (float((a - b).abs().max()), rounding)
    # and the whole attack takes the batched path when asked, with the same labels
    seq = attack(iterations=iterations, restarts=3, seed=5, signed=False, batched=False).reconstruct(upd)
    bat = attack(iterations=iterations, restarts=3, seed=5, signed=False, batched=True).reconstruct(upd)
    assert seq.stats["batched"] == 0.0 and bat.stats["batched"] == 1.0 and torch.equal(seq.labels, bat.labels)


@pytest.mark.slow  # ~18 s since issue 15 (suite time); the float32-equality tests stay in the default run
@pytest.mark.parametrize("seed", [0, 3])
def test_batched_equals_sequential_in_quality_with_signed_adam(cifar, seed) -> None:
    """Default params, convnet width 32, a real image, 4 trials x 100 signed steps. ``sign()`` turns
    rounding into +-lr pixel steps, so trials drift apart; the claim is equal *quality*, and how much
    quality rounding alone moves is measured, not assumed: the same sequential trials in float64. Each
    batched trial's PSNR is within twice the largest float32-vs-float64 PSNR change (plus 0.02 dB) of
    its sequential twin. Measured: batched vs sequential <= 0.03 dB at the attack level."""
    from fedsim.attacks.inverting_gradients import initial_inputs, pixel_box, to_pixels
    from fedsim.attacks.objectives import cosine
    from fedsim.attacks.victim import target_gradient, victim_model
    from fedsim.seeding import torch_generator

    upd = convnet_update(cifar, [0], seed=seed)
    victim = victim_model(upd)
    target, labels, truth = target_gradient(upd, victim), cifar.train_y[[0]], cifar.train_x[[0]]
    box = pixel_box(cifar.mean, cifar.std, torch.device("cpu"))
    x0 = torch.stack([initial_inputs("randn", (1, *cifar.input_shape), torch_generator(seed, "ig", k))
                      for k in range(4)])
    options = {"iterations": 100, "lr": 0.1, "signed": True, "decay": "step"}

    prior = _tv_prior

    def sequential(net, goal, bounds, start):
        return _sequential_trial(net, goal, labels, bounds, start, options)

    def quality(x: torch.Tensor) -> float:
        return psnr(to_pixels(x.float(), cifar.mean, cifar.std), truth)

    seq32 = [quality(sequential(victim, target, box, x0[k])) for k in range(4)]
    bat32 = [quality(x) for x in optimize_trials(ig.matching_loss(victim, labels, target, cosine, None, prior), x0,
                                                 box=box, **options).x]
    net64 = copy.deepcopy(victim).double()
    seq64 = [quality(sequential(net64, [t.double() for t in target], tuple(b.double() for b in box), x0[k].double()))
             for k in range(4)]
    rounding = max(abs(a - b) for a, b in zip(seq32, seq64, strict=True))
    assert max(abs(a - b) for a, b in zip(seq32, bat32, strict=True)) <= 2 * rounding + 0.02, (seq32, bat32, seq64)


def test_parameter_gradient_matches_autograd(cifar) -> None:
    spec = ModelSpec(name="convnet", width=4, norm="batch")
    model = build_model(spec, cifar.input_shape, cifar.num_classes, seed=0)
    x, y = torch.randn(2, *cifar.input_shape), cifar.train_y[:2]
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    running = model.features[1].running_mean.clone()
    for got, want in zip(parameter_gradient(model)(x, y), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.equal(model.features[1].running_mean, running)  # the attacker's model is not touched


def test_batched_progress_time_limit_and_failures(cifar, monkeypatch) -> None:
    upd = convnet_update(cifar, [0, 1], width=8)
    seen: list[tuple[int, int]] = []
    rec = attack(iterations=120, restarts=2, batched=True, schedule={"kind": "full"}).reconstruct(
        upd, progress=lambda d, t: seen.append((d, t)))
    assert rec.failed is None and rec.stats["batched"] == 1.0 and rec.stats["restarts"] == 2
    assert seen == [(100, 240), (200, 240), (240, 240)]
    rec = attack(iterations=10**6, restarts=3, time_limit_s=0.5, batched=True).reconstruct(upd)
    assert rec.failed is None and rec.stats["time_limited"] == 1.0 and rec.stats["restarts"] == 3
    assert 0 < rec.stats["iterations"] < 10**6
    monkeypatch.setattr(ig, "total_variation", lambda x: x.sum() * float("nan"))
    rec = attack(iterations=5, restarts=2, batched=True).reconstruct(upd)
    assert rec.failed and "NaN" in rec.failed and rec.stats["batched"] == 1.0


def test_same_seed_same_result_and_auto_is_sequential_on_cpu(cifar) -> None:
    upd = convnet_update(cifar, [0], width=8)
    a, b = (attack(iterations=20, restarts=2, seed=3, batched=True).reconstruct(upd) for _ in range(2))
    assert torch.equal(a.images, b.images) and a.stats["grad_loss"] == b.stats["grad_loss"]
    assert attack(iterations=5, restarts=2).reconstruct(upd).stats["batched"] == 0.0  # "auto" on a CPU
    assert attack(iterations=5, restarts=1, batched=True).reconstruct(upd).stats["batched"] == 0.0
    with pytest.raises(ValueError):
        ig.InvertingGradients.Params(batched="sometimes")
