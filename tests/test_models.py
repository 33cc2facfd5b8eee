"""Tests of fedsim.models: shapes, seeding, double backward, mask-aware dropout, norm factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.models import (
    MODELS,
    TEXT_MODELS,
    MaskDropout,
    build_model,
    dropout_layers,
    make_norm,
    record_masks,
    recorded_masks,
    set_masks,
)
from fedsim.scenario import ModelSpec

ALL = [n for n in MODELS.names() if n not in TEXT_MODELS]  # image/vector models (text: test_text_models)
# Narrow ResNets keep the double-backward tests fast on a shared CPU.
SMALL_WIDTH = {"resnet18": 8, "resnet20": 4, "convnet": 8, "mlp": 4}


def small_spec(name: str, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, width=SMALL_WIDTH.get(name, 32), **kw)


def test_all_models_registered() -> None:
    assert set(ALL) >= {"mlp", "lenet", "convnet", "resnet18", "resnet20"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(small_spec(name), shape, 10, seed=0)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet", "convnet"])
def test_small_inputs(name: str) -> None:
    model = build_model(small_spec(name), (3, 8, 8), 5, seed=0)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_lenet_matches_dlg() -> None:
    model = build_model(ModelSpec(name="lenet"), (3, 32, 32), 100)
    assert model.classifier.in_features == 768
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (12, (5, 5), (s, s), (2, 2)) for s in (2, 2, 1)
    ]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3


def test_activation_override() -> None:
    model = build_model(ModelSpec(name="lenet", activation="relu"), (3, 32, 32), 10)
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert any(isinstance(m, nn.ReLU) for m in model.modules())


def test_too_small_input_is_a_scenario_error() -> None:
    with pytest.raises(ScenarioError) as err:
        build_model(ModelSpec(name="convnet"), (3, 4, 4), 10)
    assert err.value.path == "model.name"
    with pytest.raises(ScenarioError, match="unknown model"):
        build_model(ModelSpec(name="nope"), (3, 32, 32), 10)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ALL)
def test_seeded_init_is_deterministic(name: str) -> None:
    spec = small_spec(name)
    a, b = build_model(spec, (3, 16, 16), 10, seed=1), build_model(spec, (3, 16, 16), 10, seed=1)
    c = build_model(spec, (3, 16, 16), 10, seed=2)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))


def test_build_model_keeps_caller_rng_state() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model(ModelSpec(name="convnet", width=4), (3, 32, 32), 10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("norm", ["none", "group"])
def test_double_backward(name: str, norm: str) -> None:
    model = build_model(small_spec(name, norm=norm, dropout=0.2), (3, 16, 16), 10, seed=0)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_double_backward_batchnorm() -> None:
    model = build_model(small_spec("resnet20", norm="batch"), (3, 16, 16), 10, seed=0)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_every_dropout_is_mask_dropout(name: str) -> None:
    model = build_model(small_spec(name, dropout=0.3), (3, 16, 16), 10)
    assert dropout_layers(model)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert not dropout_layers(build_model(small_spec(name), (3, 16, 16), 10))


def test_mask_dropout_set_mask_applies_in_eval_mode() -> None:
    layer = MaskDropout(0.25).eval()
    h = torch.randn(3, 7)
    mask = torch.rand(3, 7)
    layer.set_mask(mask)
    assert torch.allclose(layer(h), h * mask / 0.75)
    layer.set_mask(None)
    assert torch.equal(layer(h), h)


def test_mask_dropout_mask_receives_gradient() -> None:
    layer = MaskDropout(0.5)
    mask = torch.full((2, 4), 0.5, requires_grad=True)
    layer.set_mask(mask)
    layer(torch.ones(2, 4)).sum().backward()
    assert torch.allclose(mask.grad, torch.full((2, 4), 2.0))


def test_recorded_mask_is_the_applied_one() -> None:
    layer = MaskDropout(0.5).train()
    record_masks(layer, True)
    h = torch.rand(4, 3, 5, 5) + 1.0  # no zeros of its own
    out = layer(h)
    mask = recorded_masks(layer)[""]
    assert mask.shape == h.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out == 0, mask == 0)
    assert torch.allclose(out, h * mask / 0.5)
    record_masks(layer, False)
    assert recorded_masks(layer) == {}


def test_replaying_recorded_masks_reproduces_the_client_output() -> None:
    model = build_model(ModelSpec(name="mlp", width=4, dropout=0.5), (1, 8, 8), 10, seed=0).train()
    record_masks(model, True)
    x = torch.randn(5, 1, 8, 8)
    out_train = model(x)
    masks = recorded_masks(model)
    assert list(masks) == list(dropout_layers(model)) and len(masks) == 3
    assert all(m.shape == (5, 64) for m in masks.values())
    model.eval()
    set_masks(model, masks)
    assert torch.allclose(model(x), out_train)


def test_set_masks_rejects_unknown_layers_and_none_clears() -> None:
    model = build_model(ModelSpec(name="convnet", width=4, dropout=0.1), (3, 16, 16), 10)
    with pytest.raises(KeyError):
        set_masks(model, {"nope": torch.ones(1)})
    set_masks(model, {name: torch.ones(1, 64) for name in dropout_layers(model)})
    assert all(m.mask is not None for m in dropout_layers(model).values())
    set_masks(model, None)
    assert all(m.mask is None for m in dropout_layers(model).values())


def test_mask_dropout_p0_and_eval_are_identity() -> None:
    h = torch.randn(4, 6)
    assert torch.equal(MaskDropout(0.0).train()(h), h)
    assert torch.equal(MaskDropout(0.5).eval()(h), h)
    layer = MaskDropout(0.0).train()
    layer.record = True
    layer(h)
    assert layer.last_mask is None


def test_make_norm_kinds() -> None:
    assert isinstance(make_norm("batch", 16), nn.BatchNorm2d)
    assert isinstance(make_norm("batch", 16, dims=1), nn.BatchNorm1d)
    assert isinstance(make_norm("none", 16), nn.Identity)
    gn = make_norm("group", 12)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 12
    assert make_norm("group", 64).num_groups == 32
    model = build_model(ModelSpec(name="resnet20", width=16, norm="group"), (3, 32, 32), 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_resnet_widths() -> None:
    r20 = build_model(ModelSpec(name="resnet20", width=16, norm="batch"), (3, 32, 32), 10)
    r18 = build_model(ModelSpec(name="resnet18", width=64, norm="batch"), (3, 32, 32), 10)
    assert r20.classifier.in_features == 64
    assert r18.classifier.in_features == 512
    assert sum(p.numel() for p in r20.parameters()) < 300_000  # about 0.27 M, as in He et al.
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in r20.modules()) == 19
