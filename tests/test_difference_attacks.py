"""Attacks on DIFF2's messages: gradient differences, per-sample clipping, and who must refuse them.

Updates are hand-built here as a DIFF2 client builds them (spec ``algorithms-more.md`` §9.2): over the
client's examples z_i, ``(1/n) sum_i clip_C(grad l(x_r; z_i) - grad l(x_{r-1}; z_i))``, with the
brute-force reference computed by plain ``torch.autograd`` on two separately built models, one example
at a time; the attacker's side goes through :func:`fedsim.attacks.victim.victim_model` as every attack does.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_beats_trivial, psnr_db
from torch import nn

from fedsim.attacking import observe
from fedsim.attacks.batched import matching_loss, parameter_gradient
from fedsim.attacks.dlg import ImprovedDeepLeakage
from fedsim.attacks.fedavg_inversion import FedAvgInversion, sharpness_of
from fedsim.attacks.inverting_gradients import InvertingGradients, gradient_distance
from fedsim.attacks.label_recovery import DIFFERENCE_LABELS, recover_labels
from fedsim.attacks.objectives import l2
from fedsim.attacks.unrolling import Sharpness, unrolled_delta
from fedsim.attacks.victim import UpdateMismatchError, victim_model
from fedsim.data import load_dataset, normalize
from fedsim.models import build_model
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ClientUpdate, TaskInfo

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
SPEC = ModelSpec(name="mlp", width=1)  # 64 -> 16 -> 16 -> 16 -> 10, ReLU, no norm


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataSpec(dataset="digits"))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def two_models(bundle, spec: ModelSpec = SPEC, eta: float = 0.5, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``(x_r, x_{r-1})``: a fresh model, and the same after one GD step of size ``eta`` on 64 other digits."""
    prev = build_model(spec, bundle.input_shape, bundle.num_classes, seed=seed)
    cur = build_model(spec, bundle.input_shape, bundle.num_classes, seed=seed)
    xo, yo = normalize(bundle.train_x[100:164], bundle.mean, bundle.std), bundle.train_y[100:164]
    grads = torch.autograd.grad(F.cross_entropy(prev(xo), yo), list(prev.parameters()))
    with torch.no_grad():
        for p, g in zip(cur.parameters(), grads, strict=True):
            p.sub_(eta * g)
    return cur, prev


def brute_message(cur: nn.Module, prev: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                  clip: float | None, create_graph: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DIFF2's message by plain autograd, one example at a time: the mean of the clipped per-example
    gradient differences (``prev`` None: plain gradients). Returns it and the unclipped per-example norms."""
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(cur(x[i:i + 1]), y[i:i + 1]), list(cur.parameters()),
                                create_graph=create_graph)
        if prev is not None:
            g0 = torch.autograd.grad(F.cross_entropy(prev(x[i:i + 1]), y[i:i + 1]), list(prev.parameters()),
                                     create_graph=create_graph)
            g = [a - b for a, b in zip(g, g0, strict=True)]
        rows.append(g)
    norms = torch.stack([torch.sqrt(sum(t.pow(2).sum() for t in g)) for g in rows])
    factors = torch.ones_like(norms) if clip is None else torch.clamp(clip / norms, max=1.0)
    mean = [sum(f * g[k] for f, g in zip(factors, rows, strict=True)) / len(rows) for k in range(len(rows[0]))]
    return mean, norms.detach()


def diff2_update(bundle, cur: nn.Module, prev: nn.Module | None, idx: list[int], defenses: tuple = (),
                 clip: float | None = None, spec: ModelSpec = SPEC, rnd: int = 2) -> ClientUpdate:
    """The curious server's view of a DIFF2 client holding examples ``idx`` (``prev`` None: a restart round)."""
    x, y = normalize(bundle.train_x[idx], bundle.mean, bundle.std), bundle.train_y[idx]
    message, _ = brute_message(cur, prev, x, y, clip)
    names = [n for n, _ in cur.named_parameters()]
    task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                    spec.model_dump(), "fedsgd")
    return ClientUpdate(rnd, 0, task, state(cur), dict(zip(names, (m.detach() for m in message), strict=True)),
                        len(idx), reference_state=None if prev is None else state(prev),
                        side_info={"labels": y.clone()}, defenses=defenses)


def delta_x(cur: nn.Module, prev: nn.Module) -> float:
    """``|x_r - x_{r-1}|_2`` over all parameters, computed independently of the code under test."""
    flat = torch.cat([(a - b).flatten() for a, b in zip(cur.parameters(), prev.parameters(), strict=True)])
    return float(flat.detach().norm())


CASES = {  # name -> (difference round, c1, c2): the described DIFF2 clip coefficients, None = not described
    "plain gradient": (False, None, None),
    "difference": (True, None, None),
    "clipped difference": (True, 1.0, "median"),
    "clipped restart": (False, "median", 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dummy_message_equals_a_brute_force_diff2_message(digits, case) -> None:
    """The attacker's dummy message (sequential and vmapped-over-trials paths) and its input gradient
    equal DIFF2's message computed by plain autograd on two separately built models, one example at a
    time; with the clip radius set at the median per-example norm, so some examples are clipped and
    some are not. Fails if the reference model is ignored, the clip is skipped or applied to the mean,
    or the radius is not ``c2 * |x_r - x_{r-1}|`` over all parameters."""
    is_diff, c1, c2 = CASES[case]
    cur, prev = two_models(digits)
    ref = prev if is_diff else None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((4, 1, 8, 8), generator=gen, requires_grad=True)
    y = torch.tensor([3, 1, 4, 1])
    defenses: tuple = ()
    clip = None
    if c1 is not None:
        clip = float(brute_message(cur, ref, x.detach(), y, None)[1].median())
        scale = delta_x(cur, prev) if is_diff else 1.0
        coefficients = {"c1": c1, "c2": c2}
        coefficients["c2" if is_diff else "c1"] = clip / scale
        defenses = ({"name": "diff2", **coefficients, "restart_period": 3},)
    upd = diff2_update(digits, cur, ref, [0, 1, 2, 3], defenses)
    expected, norms = brute_message(cur, ref, x, y, clip, create_graph=True)
    if clip is not None:
        assert bool((norms > clip).any()) and bool((norms < clip).any())  # the clip is active, not everywhere
    model = victim_model(upd)
    got = parameter_gradient(model)(x, y)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    target = [t.clone() for t in upd.update.values()]
    loss = gradient_distance(model, x, y, target, l2)
    brute = l2(expected, target)
    torch.testing.assert_close(loss, brute, rtol=1e-5, atol=1e-9)
    (dx_got,) = torch.autograd.grad(loss, [x])
    (dx_want,) = torch.autograd.grad(brute, [x])
    torch.testing.assert_close(dx_got, dx_want, rtol=1e-4, atol=1e-8)
    trials = torch.stack([x.detach(), x.detach().flip(0)])  # two trials at once, as batched restarts run
    batched = torch.func.vmap(matching_loss(model, y, target, l2))(trials)
    flipped = l2(brute_message(cur, ref, x.detach().flip(0), y, clip)[0], target)
    torch.testing.assert_close(batched, torch.stack([brute.detach(), flipped]), rtol=1e-5, atol=1e-9)


def test_reference_that_does_not_fit_is_a_failure_with_a_reason(digits) -> None:
    cur, prev = two_models(digits)
    upd = diff2_update(digits, cur, prev, [0])
    bad = dataclasses.replace(upd, reference_state={k: v for k, v in upd.reference_state.items()
                                                    if k != "classifier.bias"})
    with pytest.raises(UpdateMismatchError, match="reference state"):
        victim_model(bad)
    rec = ig(20).reconstruct(bad)
    assert rec.failed and "reference state" in rec.failed


def ig(iterations: int, labels: str = "known", defense: bool = False, **params) -> InvertingGradients:
    return InvertingGradients(InvertingGradients.Params(**{"tv": 0.0, **params}),
                              Knowledge(labels=labels, defense=defense), Budget(iterations=iterations),
                              torch.device("cpu"), 0)


WIDE = ModelSpec(name="mlp", width=4)  # hidden 64


def test_inverting_gradients_reconstructs_a_digit_from_a_gradient_difference(digits) -> None:
    """IG (cosine, no TV: on 8x8 digits the default TV weight over-smooths) on one digit's difference
    message, MLP 64-64-64-64-10, x_r one GD step (eta 0.5) from x_{r-1}, labels known (they cancel from a
    difference, see the label test), 300 iterations. Measured on digit 0: 35.4 dB matching the
    difference; 8.4 dB when the same message is matched as a plain gradient at x_r (the pre-DIFF2
    attack); the best trivial guess (the image's own mean colour) 9.8 dB. Digit 3: 28.9 / 5.1 / 9.5 dB."""
    cur, prev = two_models(digits, WIDE)
    upd = diff2_update(digits, cur, prev, [0], spec=WIDE)
    truth = digits.train_x[[0]]
    aware = ig(300).reconstruct(upd)
    naive = ig(300).reconstruct(dataclasses.replace(upd, reference_state=None))
    assert aware.failed is None and naive.failed is None
    score = psnr_db(aware.images, truth)
    assert_beats_trivial(score, truth, 10.0)
    assert score >= psnr_db(naive.images, truth) + 10.0


def test_labels_cancel_from_a_difference_so_inference_refuses(digits) -> None:
    """The classifier bias entry of a gradient difference is ``mean_i (p_i(x_r) - p_i(x_{r-1}))``: the
    same whatever the labels (checked with two label sets), so no label rule can read it; inference
    raises with the reason, an attack inferring labels fails with it, and DLG's joint labels still run."""
    cur, prev = two_models(digits)
    upd = diff2_update(digits, cur, prev, [0, 1])
    x = normalize(digits.train_x[[0, 1]], digits.mean, digits.std)
    other, _ = brute_message(cur, prev, x, torch.tensor([7, 7]), None)
    names = [n for n, _ in cur.named_parameters()]
    torch.testing.assert_close(upd.update["classifier.bias"], other[names.index("classifier.bias")].detach())
    with pytest.raises(ValueError, match="cannot be inferred from a gradient difference"):
        recover_labels(upd, 2, "auto")
    rec = ig(5, labels="infer").reconstruct(upd)
    assert rec.failed == DIFFERENCE_LABELS
    restart = diff2_update(digits, cur, None, [0, 1])  # a restart round's message is a gradient: rules apply
    assert sorted(recover_labels(restart, 2, "auto").tolist()) == sorted(digits.train_y[[0, 1]].tolist())
    idlg = ImprovedDeepLeakage(ImprovedDeepLeakage.Params(), Knowledge(), Budget(iterations=5),
                               torch.device("cpu"), 0)
    assert idlg.reconstruct(upd).failed == DIFFERENCE_LABELS


def test_attacks_that_cannot_match_a_difference_fail_with_a_reason(digits) -> None:
    cur, prev = two_models(digits)
    upd = diff2_update(digits, cur, prev, [0])
    fedavg = dataclasses.replace(upd, task=dataclasses.replace(upd.task, protocol="fedavg"),
                                 hyperparams={"lr": 0.1, "steps": 1, "batch_size": 1})
    rec = FedAvgInversion(FedAvgInversion.Params(), Knowledge(labels="known", local_hparams=True),
                          Budget(iterations=5), torch.device("cpu"), 0).reconstruct(fedavg)
    assert rec.failed and "cannot match a gradient difference" in rec.failed
    from fedsim.attacks.dia import DropoutInversionAttack

    dia = DropoutInversionAttack(DropoutInversionAttack.Params(), Knowledge(labels="known"), Budget(iterations=5),
                                 torch.device("cpu"), 0)
    rec = dia.reconstruct(upd)
    assert rec.failed and "cannot match a gradient difference" in rec.failed


def test_clip_radius_must_be_positive(digits) -> None:
    cur, prev = two_models(digits)
    upd = diff2_update(digits, cur, prev, [0], defenses=({"name": "diff2", "c1": 1.0, "c2": 0.0},))
    assert "clip radius" in (ig(5, defense=True).reconstruct(upd).failed or "")
    assert math.isfinite(delta_x(cur, prev)) and delta_x(cur, prev) > 0


# --- DP-SAT: the perturbed point in unrolled local training -----------------------------------------------


def dp_sat_scenario(raw: dict, variant: str, weight_decay: float, persist: bool = False, defense: bool = True):
    """4 clients x 4 digits, fedavg, 3 full-batch local steps of plain SGD (lr 0.5), DP-SAT with rho 0.5,
    sigma 0 and a clipping norm no gradient reaches (its privatized gradient is then the mean gradient)."""
    raw = {**raw, "data": {**raw["data"], "train_subset": 16}}
    raw["federation"] = {**raw["federation"], "protocol": "fedavg", "rounds": 1,
                         "local": {"batch_size": 4, "lr": 0.5, "steps": 3, "weight_decay": weight_decay}}
    raw["defenses"] = [{"name": "dp_sat", "params": {"noise_multiplier": 0.0, "max_grad_norm": 1e6, "poisson": False,
                                                     "rho": 0.5, "variant": variant, "persist": persist}}]
    raw["attacks"] = [{"name": "fedavg_inversion", "rounds": [1], "clients": "all", "budget": {"iterations": 2},
                       "knowledge": {"local_hparams": True, "defense": defense, "labels": "known"}}]
    return parse_scenario(raw)


@pytest.mark.parametrize(("variant", "weight_decay"), [("sat", 0.0), ("sat", 0.1), ("momentum", 0.1)])
def test_dp_sat_aware_unrolling_reproduces_a_real_dp_sat_client(tiny_raw, variant, weight_decay) -> None:
    """The update a real dp_sat client sent (Opacus, fedsim.defenses.dp_sat) against the attacker's unrolled
    simulation on the client's true batch: DP-SAT-aware (the attacker's own previous simulated gradient, or
    update, as the direction) within 1e-5 relative (measured ~1e-7); unaware (plain SGD steps) off by more
    than 0.1 (measured 0.2-0.6); with weight decay the other variant's direction is off too (measured ~0.15),
    so the variant is modelled, not only the radius."""
    scenario = dp_sat_scenario(tiny_raw, variant, weight_decay)
    outcome = run_federation(scenario)
    setup = setup_for(scenario)
    descriptions = [dict(d.public_description()) for d in setup.defenses]
    assert len(outcome.capture.updates) == 4
    for cap in outcome.capture.updates:
        view = observe(cap, setup.task, scenario, scenario.attacks[0], descriptions)
        model = victim_model(view)
        x, y = normalize(cap.truth.inputs, setup.task.mean, setup.task.std), cap.truth.labels
        assert len(x) == 4
        sent = torch.cat([view.update[n].flatten() for n, _ in model.named_parameters()])
        sharpness, unknown = sharpness_of(view.defenses)
        assert sharpness == Sharpness(0.5, variant) and not unknown

        errors = {}
        for name, s in (("aware", sharpness), ("unaware", None),
                        ("other variant", Sharpness(0.5, "momentum" if variant == "sat" else "sat"))):
            delta = unrolled_delta(model, x, y, lr=0.5, steps=3, batch_size=4, weight_decay=weight_decay,
                                   sharpness=s)
            errors[name] = float((torch.cat([d.detach().flatten() for d in delta]) - sent).norm() / sent.norm())
        assert errors["aware"] < 1e-5 and errors["unaware"] > 0.1, errors
        if weight_decay:
            assert errors["other variant"] > 0.05, errors


def test_dp_sat_awareness_is_validated_and_reported(tiny_raw) -> None:
    """fedavg_inversion's knowledge.defense models dp_sat only: refused without it; with persist the unknown
    first-step direction is reported in the outcome's stats, not hidden."""
    from fedsim.errors import ScenarioError

    scenario = dp_sat_scenario(tiny_raw, "sat", 0.0, persist=True)
    FedAvgInversion.check_scenario(scenario, scenario.attacks[0])
    plain = scenario.model_copy(update={"defenses": []})
    with pytest.raises(ScenarioError, match="knowledge.defense"):
        FedAvgInversion.check_scenario(plain, plain.attacks[0])
    outcome = run_federation(scenario)
    setup = setup_for(scenario)
    view = observe(outcome.capture.updates[0], setup.task, scenario, scenario.attacks[0],
                   [dict(d.public_description()) for d in setup.defenses])
    rec = FedAvgInversion.from_spec(scenario.attacks[0], torch.device("cpu"), 0).reconstruct(view)
    assert rec.failed is None and rec.stats["sharpness_first_step_unknown"] == 1.0 and rec.stats["sharpness_rho"] == 0.5


# --- validation of DIFF2 scenarios --------------------------------------------------------------------------


def diff2_raw(raw: dict, attack: str, rounds: list[int], **knowledge) -> dict:
    raw = {**raw, "data": {**raw["data"], "train_subset": 16}}
    raw["federation"] = {**raw["federation"], "rounds": 3}
    raw["defenses"] = [{"name": "diff2", "params": {"restart_period": 2, "sigma1": 0.0, "sigma2": 0.0}}]
    raw["attacks"] = [{"name": attack, "rounds": rounds, "clients": [0], "budget": {"iterations": 5},
                       "knowledge": knowledge}]
    return raw


@pytest.mark.parametrize(("attack", "rounds", "knowledge", "error"), [
    ("inverting_gradients", [1, 2], {}, "attacks[0].knowledge.labels: 'infer' cannot work in diff2's difference"),
    ("idlg", [2], {}, "attacks[0].knowledge.labels: 'infer' cannot work"),
    ("dia", [1], {}, "attacks[0]: dia cannot match the gradient differences diff2 clients send"),
    ("inverting_gradients", [1, 3], {}, None),  # restart rounds (T = 2): a clipped gradient, labels can be read
    ("inverting_gradients", [2], {"labels": "known", "defense": True}, None),  # diff2's clipping is modelled
    ("dlg", [2], {}, None),  # DLG optimizes its labels with the images
    ("gradinversion", [2], {"labels": "known"}, None),
])
def test_diff2_scenarios_refuse_what_cannot_attack_a_difference(tiny_raw, attack, rounds, knowledge, error) -> None:
    from fedsim.errors import ScenarioError

    raw = diff2_raw(tiny_raw, attack, rounds, **knowledge)
    if error is None:
        parse_scenario(raw)
        return
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert str(err.value).startswith(error)


def test_placement_rows_differ_only_in_the_defenses() -> None:
    """benchmarks/diff2_placements.py compares noise placements: within a setting its rows differ only in
    ``defenses`` (the placement, and SecAgg+ for distributed), and the scenario it runs validates."""
    import importlib.util
    from pathlib import Path

    import yaml

    from fedsim.teaching.comparisons import Comparison
    from fedsim.teaching.resolve import resolved_scenario

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "diff2_placements.py"
    spec = importlib.util.spec_from_file_location("diff2_placements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = yaml.safe_load(module.BASE.read_text(encoding="utf-8"))
    for setting in ("sigma=0", "eps=8"):
        rows = {p: resolved_scenario(module.row_scenario(base, setting, p, 5, 0)) for p in module.PLACEMENTS}
        comparison = Comparison("diff2 placements", str(path), rows, ("defenses",))
        assert comparison.unexplained() == {}
        assert all(comparison.differences(p) for p in list(rows)[1:])


def test_diff2_counts_as_modelled_in_the_defense_aware_stats(digits) -> None:
    cur, prev = two_models(digits)
    upd = diff2_update(digits, cur, prev, [0, 1], defenses=({"name": "diff2", "c1": 1.0, "c2": 5.0},))
    rec = ig(5, defense=True).reconstruct(upd)
    assert rec.failed is None and rec.stats["defenses_modeled"] == 1.0 and rec.stats["defenses_skipped"] == 0.0
