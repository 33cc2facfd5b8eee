"""The text models (gpt, bert) under training: shapes, causality, relaxed inputs, double backward, the LM loss,
and Opacus per-sample gradients / ghost clipping against per-example gradients computed one example at a time."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models import build_model
from fedsim.scenario import ModelSpec
from fedsim.training import lm_loss

V, T, B, WIDTH = 40, 6, 3, 32
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _model(name: str, classes: int = 4, depth: int = 1, seed: int = 0) -> nn.Module:
    num_classes = V if name == "gpt" else classes
    return build_model(ModelSpec(name=name, width=WIDTH, depth=depth), (T,), num_classes, seed=seed, vocab_size=V)


def _batch(name: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=gen)
    y = x.clone() if name == "gpt" else torch.randint(0, 4, (B,), generator=gen)
    return x, y


def _loss(name: str):  # noqa: ANN202
    return lm_loss if name == "gpt" else F.cross_entropy


def test_output_shapes() -> None:
    x, _ = _batch("gpt")
    assert _model("gpt")(x).shape == (B, T, V)
    assert _model("bert", classes=7)(x).shape == (B, 7)


def test_gpt_is_causal_and_bert_is_not() -> None:
    x, _ = _batch("gpt")
    for t in range(T - 1):
        changed = x.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % V
        gpt = _model("gpt").eval()
        a, b = gpt(x), gpt(changed)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4), t  # the changed position itself moves
    bert = _model("bert").eval()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    assert not torch.allclose(bert.hidden(x)[:, 0], bert.hidden(changed)[:, 0], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_one_hot_input_equals_ids(name: str) -> None:
    x, _ = _batch(name)
    model = _model(name).eval()
    assert torch.allclose(model(F.one_hot(x, V).float()), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_double_backward(name: str) -> None:
    """What TAG needs: the gradient of a gradient-matching loss w.r.t. a relaxed (B, T, V) input."""
    x, y = _batch(name)
    model = _model(name)
    relaxed = F.one_hot(x, V).float().requires_grad_(True)
    grads = torch.autograd.grad(_loss(name)(model(relaxed), y), list(model.parameters()), create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    assert relaxed.grad is not None and relaxed.grad.abs().sum() > 0


def test_lm_loss_is_the_mean_next_token_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    per_example = []
    for i in range(B):  # brute force: -log softmax of the next token, position by position
        nll = [math.log(sum(math.exp(v) for v in logits[i, t].tolist())) - float(logits[i, t, ids[i, t + 1]])
               for t in range(T - 1)]
        per_example.append(sum(nll) / (T - 1))
    want = torch.tensor(per_example)
    assert torch.allclose(lm_loss(logits, ids, reduction="none"), want, atol=1e-5)
    assert math.isclose(float(lm_loss(logits, ids, reduction="sum")), float(want.sum()), rel_tol=1e-5)
    assert math.isclose(float(lm_loss(logits, ids)), float(want.mean()), rel_tol=1e-5)


def _per_example_grads(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Brute force: one forward/backward per example (no Opacus)."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        _loss(name)(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_opacus_per_sample_gradients_equal_brute_force(name: str, mode: str) -> None:
    from opacus.grad_sample.utils import prepare_module

    x, y = _batch(name)
    model = _model(name)
    want = _per_example_grads(model, name, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = prepare_module(model, mode, wrap_model=mode == "ew", batch_first=True, loss_reduction="mean")
        _loss(name)(wrapped(x) if mode == "ew" else model(x), y).backward()
    try:
        for n, p in model.named_parameters():
            assert p.grad_sample.shape == (B, *p.shape), n  # one gradient per EXAMPLE (not per position)
            for i in range(B):
                assert torch.allclose(p.grad_sample[i], want[i][n], atol=1e-5, rtol=1e-4), (n, i)
    finally:
        if hasattr(wrapped, "cleanup"):
            wrapped.cleanup()


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_ghost_clipping_gives_the_sum_of_clipped_per_example_gradients(name: str) -> None:
    """Ghost clipping (noise 0) = sum_i min(1, C / ||g_i||) g_i / B, with g_i computed one example at a time."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    x, y = _batch(name)
    model = _model(name)
    per_example = _per_example_grads(model, name, x, y)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())) for grads in per_example]
    clip = sorted(norms)[1]  # between the smallest and the largest norm: some examples clipped, some not
    want = {n: sum(min(1.0, clip / (norms[i] + 1e-6)) * per_example[i][n] for i in range(B)) / B
            for n, _ in model.named_parameters()}

    hooks = prepare_module(model, "ghost", wrap_model=False, batch_first=True, loss_reduction="mean",
                           max_grad_norm=clip)
    cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
              expected_batch_size=B, loss_reduction="mean")

    class Reducible(nn.Module):
        reduction = "mean"

        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return _loss(name)(logits, labels, reduction=self.reduction)

    try:
        DPLossFastGradientClipping(hooks, opt, Reducible(), "mean")(model(x), y).backward()
        opt.pre_step()
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, want[n], atol=1e-5, rtol=1e-4), n
    finally:
        hooks.cleanup()


def test_evaluate_gives_the_mean_next_token_loss_and_accuracy() -> None:
    """fedsim.training.evaluate on a language model: mean next-token CE (nats) and top-1 next-token accuracy over
    all B*(T-1) predictions, against a hand computation."""
    from fedsim.training import evaluate

    x, _ = _batch("gpt")
    model = _model("gpt").eval()
    with torch.no_grad():
        logits = model(x)[:, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
    acc = (logits.argmax(-1) == x[:, 1:]).float().mean()
    loss, accuracy = evaluate(model, x, x, mean=(), std=(), batch_size=2, device="cpu", task="language_modeling")
    assert math.isclose(loss, float(nll.mean()), rel_tol=1e-5)
    assert math.isclose(accuracy, float(acc), rel_tol=1e-6)


def test_min_train_batch_probes_a_text_model_with_token_ids() -> None:
    """The probe's zero example must be token ids: a float (1, T) is read as a relaxed (1, T, V) input and fails,
    which would make a text model look untrainable on one example (DP-SGD refuses such models)."""
    from fedsim.training import min_train_batch

    model = _model("gpt")
    model.unused_norm = nn.GroupNorm(1, WIDTH)  # a normalization module: the probe runs a forward pass
    assert min_train_batch(model, (T,)) == 1
