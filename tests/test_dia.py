"""The Dropout Inversion Attack (Scheliga, Mäder, Seeland, AAAI 2023), its oracle, and the ViT victim.

Updates are built here as a client computes them: the DIA paper's MLP (3 x 512, GELU, dropout p) in
train mode on a real bundled MNIST digit, the global torch RNG seeded before the forward pass, the
masks recorded as ground truth. Budgets are iteration counts (never time), so the margins do not
depend on the machine's load.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_beats_trivial
from torch import nn

from fedsim.attacking import observe
from fedsim.attacks.dia import DropoutInversionAttack, DropoutOracle, mask_shapes
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.data import load_dataset, normalize
from fedsim.errors import ScenarioError
from fedsim.models import MaskDropout, build_model, dropout_layers, record_masks, recorded_masks, set_masks
from fedsim.run import run_scenario
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ClientUpdate, TaskInfo

torch.set_num_threads(1)
ITERATIONS = 200
IMAGE = 3  # a "0"


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataSpec(dataset="mnist-mini"))


def dropout_update(bundle, idx: list[int], p: float, oracle: bool = False) -> tuple[ClientUpdate, dict]:
    """The FedSGD update of the DIA MLP under dropout ``p``, and the client's true masks."""
    spec = ModelSpec(name="mlp", width=32, activation="gelu", dropout=p)
    model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=0).train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    record_masks(model, True)
    torch.manual_seed(1234)  # the client's dropout masks
    x, y = bundle.train_x[idx], bundle.train_y[idx]
    loss = F.cross_entropy(model(normalize(x, bundle.mean, bundle.std)), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    masks = {f"mask/{k}": v for k, v in recorded_masks(model).items()}
    task = TaskInfo("mnist-mini", bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                    spec.model_dump(), "fedsgd")
    update = {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    side_info = {"oracle_masks": masks} if oracle else {}
    return ClientUpdate(0, 0, task, state, update, len(idx), side_info=side_info), masks


def run(cls, update: ClientUpdate, iterations: int = ITERATIONS, seed: int = 0, **params):
    attack = cls(cls.Params(**params), Knowledge(oracle_masks=cls is DropoutOracle), Budget(iterations=iterations),
                 torch.device("cpu"), seed)
    return attack, attack.reconstruct(update)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / F.mse_loss(a, b).item())


@pytest.fixture(scope="module")
def results(mnist):
    """PSNR of IG at p = 0 and p = 0.5, and of DIA and the oracle at p = 0.5, on the same digit. IG runs
    with DIA's TV weight (1e-5) and the same budget, so only what an attack does about the masks differs
    (with IG's default 0.01 a gap would partly be the prior's)."""
    truth = mnist.train_x[[IMAGE]]
    ig_params = {"tv": DropoutInversionAttack.Params().tv}
    out = {"ig_p0": psnr(run(InvertingGradients, dropout_update(mnist, [IMAGE], 0.0)[0], **ig_params)[1].images,
                         truth)}
    update, true_masks = dropout_update(mnist, [IMAGE], 0.5, oracle=True)
    out["ig"] = psnr(run(InvertingGradients, update, **ig_params)[1].images, truth)
    dia, rec = run(DropoutInversionAttack, update)
    out.update(dia=psnr(rec.images, truth), dia_rec=rec, dia_trial=dia.last_trial, true_masks=true_masks)
    _, rec = run(DropoutOracle, update)
    out.update(oracle=psnr(rec.images, truth), oracle_rec=rec, truth=truth)
    return out


def test_inverting_gradients_fails_under_dropout(results) -> None:
    """IG (TV 1e-5), 200 iterations: 98.1 dB without dropout, 10.2 dB at p = 0.5 (measured).
    The digit's flat mean colour scores 8.8 dB. Asserted: IG at p = 0 far above that guess, and a drop
    of >= 15 dB."""
    assert_beats_trivial(results["ig_p0"], results["truth"], 25.0, metric=psnr)
    assert results["ig_p0"] - results["ig"] >= 15


def test_dia_recovers_what_ig_cannot_and_nears_the_oracle(results) -> None:
    """p = 0.5, 200 iterations: DIA 55.2 dB, oracle 54.9 dB (it stops once its loss is
    < 1e-5), IG 10.2 dB (measured). Asserted with headroom: DIA >= the flat guess + 25 dB, >= IG + 20 dB,
    and within 10 dB of the oracle."""
    assert_beats_trivial(results["dia"], results["truth"], 25.0, metric=psnr)
    assert results["dia"] - results["ig"] >= 20
    assert results["dia"] >= results["oracle"] - 10
    assert_beats_trivial(results["oracle"], results["truth"], 25.0, metric=psnr)


def test_dia_masks_stay_in_the_unit_interval_and_keep_about_1_minus_p(results) -> None:
    trial, true_masks = results["dia_trial"], results["true_masks"]
    assert set(trial.masks) == {k.removeprefix("mask/") for k in true_masks}
    for name, mask in trial.masks.items():
        assert mask.shape == true_masks[f"mask/{name}"].shape
        assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0
        assert abs(float(mask.mean()) - 0.5) < 0.1
    stats = results["dia_rec"].stats
    assert stats["dropout_layers"] == 3 and abs(stats["mask_keep_rate"] - 0.5) < 0.1
    assert results["dia_rec"].labels.tolist() == [0]  # inferred from the bias gradient despite dropout


def test_dia_never_reads_the_true_masks(mnist) -> None:
    """The same update with and without (even corrupted) oracle masks gives the identical result."""
    plain, _ = dropout_update(mnist, [IMAGE], 0.25)
    told, masks = dropout_update(mnist, [IMAGE], 0.25, oracle=True)
    junk = ClientUpdate(told.round, told.partition_id, told.task, told.global_state, told.update, 1,
                        side_info={"oracle_masks": {k: 1 - v for k, v in masks.items()}})
    a, b, c = (run(DropoutInversionAttack, u, iterations=20)[1] for u in (plain, told, junk))
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert a.stats["grad_loss"] == b.stats["grad_loss"]


def test_without_dropout_dia_is_inverting_gradients(mnist) -> None:
    update, masks = dropout_update(mnist, [IMAGE], 0.0)
    assert masks == {}
    _, rec = run(DropoutInversionAttack, update, iterations=150)
    assert rec.failed is None and rec.stats["dropout_layers"] == 0
    assert_beats_trivial(psnr(rec.images, mnist.train_x[[IMAGE]]), mnist.train_x[[IMAGE]], 25.0, metric=psnr)


def test_same_seed_same_result_other_seed_other_masks(mnist) -> None:
    update, _ = dropout_update(mnist, [IMAGE], 0.25)
    (a1, r1), (_, r2), (a3, r3) = (run(DropoutInversionAttack, update, iterations=5, seed=s) for s in (1, 1, 2))
    assert torch.equal(r1.images, r2.images)
    assert not torch.equal(r1.images, r3.images)
    assert any(not torch.equal(a1.last_trial.masks[k], a3.last_trial.masks[k]) for k in a1.last_trial.masks)


def test_oracle_needs_masks_that_fit(mnist) -> None:
    update, masks = dropout_update(mnist, [IMAGE], 0.25)
    _, rec = run(DropoutOracle, update, iterations=5)
    assert rec.failed and "oracle_masks" in rec.failed
    wrong = ClientUpdate(0, 0, update.task, update.global_state, update.update, 1,
                         side_info={"oracle_masks": {"mask/nope": next(iter(masks.values()))}})
    _, rec = run(DropoutOracle, wrong, iterations=5)
    assert rec.failed and "do not fit" in rec.failed


SCENARIO = {
    "name": "dia-tiny", "seed": 3, "device": "cpu",
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 2, "activation": "gelu", "dropout": 0.25},
    "federation": {"clients": 2, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 1, "lr": 0.1}},
    "backend": {"kind": "inprocess"},
    "attacks": [
        {"name": "dia", "budget": {"iterations": 5}},
        {"name": "dia_oracle", "knowledge": {"oracle_masks": True}, "budget": {"iterations": 5}},
    ],
}


def test_oracle_refuses_a_threat_model_without_oracle_masks() -> None:
    raw = {**SCENARIO, "attacks": [SCENARIO["attacks"][0], {"name": "dia_oracle"}]}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert info.value.path == "attacks[1].knowledge.oracle_masks" and "needs true" in info.value.reason
    raw = {**SCENARIO, "federation": {**SCENARIO["federation"], "protocol": "fedavg"}}
    with pytest.raises(ScenarioError, match="fedsgd"):
        parse_scenario(raw)


def test_only_a_granted_attack_sees_the_masks_and_its_output_is_labelled_oracle() -> None:
    scenario = parse_scenario(SCENARIO)
    (cap,) = run_federation(scenario, backend="inprocess").capture.updates
    task = setup_for(scenario).task
    blind, told = (observe(cap, task, scenario, spec, []) for spec in scenario.attacks)
    assert "oracle_masks" not in blind.side_info
    layers = dropout_layers(build_model(scenario.model, task.input_shape, task.num_classes))
    assert {k.removeprefix("mask/") for k in told.side_info["oracle_masks"]} == set(layers)
    result = run_scenario(scenario, write=False, backend="inprocess")
    assert [(o.attack, o.oracle, o.failed) for o in result.outcomes] == [("dia", False, None),
                                                                       ("dia_oracle", True, None)]


def test_the_dia_mlp_has_the_papers_shape() -> None:
    """``mlp`` with width 32, GELU, dropout p is the paper's MLP: 3 x [Linear(no bias, 512) -> GELU -> Dropout]."""
    model = build_model(ModelSpec(name="mlp", width=32, activation="gelu", dropout=0.25), (3, 32, 32), 10)
    hidden = [m for m in model.features if isinstance(m, nn.Linear)]
    assert [(m.out_features, m.bias) for m in hidden] == [(512, None)] * 3
    assert sum(isinstance(m, nn.GELU) for m in model.features) == 3
    assert [layer.p for layer in dropout_layers(model).values()] == [0.25] * 3


def test_vit_builds_double_backpropagates_and_records_masks() -> None:
    spec = ModelSpec(name="vit", width=4, dropout=0.25)  # dim 32: the default (256) is slow for a test
    model = build_model(spec, (3, 32, 32), 10, seed=0).train()
    layers = dropout_layers(model)
    assert len(layers) == 1 + 4 * 4 and all(isinstance(m, MaskDropout) and m.p == 0.25 for m in layers.values())
    assert build_model(ModelSpec(name="vit"), (3, 32, 32), 10).head.in_features == 256
    record_masks(model, True)
    model(torch.randn(2, 3, 32, 32))
    masks = recorded_masks(model)
    assert set(masks) == set(layers)
    assert masks["emb_dropout"].shape == (2, 65, 32) and masks["layers.0.0.attn_dropout"].shape == (2, 16, 65, 65)
    shapes = mask_shapes(model.eval(), torch.zeros(2, 3, 32, 32))
    assert {k: tuple(v) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in masks.items()}
    soft = {k: torch.full_like(v, 0.7, requires_grad=True) for k, v in masks.items()}
    set_masks(model, soft)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    grads = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([1, 2])), list(model.parameters()),
                                create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in soft.values())
    with pytest.raises(ScenarioError, match="divisible"):
        build_model(ModelSpec(name="vit"), (3, 30, 30), 10)


def test_the_sweep_figure_and_tables_are_written(tmp_path) -> None:
    from fedsim.teaching import dia_figure

    image = torch.rand(1, 3, 8, 8)
    rows = [{"p": p, "method": m, "round": 1, "client": 0, "oracle": m == "dia_oracle", "psnr": 20.0 + p,
             "mse": 0.01, "iterations": 5.0, "seconds": 0.1, "failed": None,
             "image": None if m == "dia" and p else image, "truth": image}
            for p in (0.0, 0.5) for m in ("inverting_gradients", "dia", "dia_oracle")]
    dia_figure.plot(rows, tmp_path / "f.png")
    dia_figure.write_tables(rows, tmp_path)
    assert (tmp_path / "f.png").stat().st_size > 0
    assert (tmp_path / "dia_sweep.csv").read_text().count("\n") == 1 + len(rows)
    assert dia_figure.SCENARIO.is_file()
