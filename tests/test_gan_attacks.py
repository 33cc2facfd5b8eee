"""GAN-prior gradient inversion: the latent search (``gan_latent``) and GIFD (``gifd``).

The projections and the schedule are checked against exact references; the attacks run on real
mnist-5k *test* digits (the shipped prior ``mnist-dcgan`` was trained on mnist-5k train examples
2000..3999, so these are images it never saw) against an untrained ConvNet (width 16, seed 0),
batch 1, labels inferred. A black image scores 7.8-10.3 dB PSNR against test digits 0-7.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import BROKEN_UPDATES, assert_beats_trivial, broken_update, make_update, trivial_score

from fedsim.attacks.gan_latent import GanLatent
from fedsim.attacks.gan_prior import (
    gifd_lr,
    latent_kl,
    load_attack_prior,
    project_l1_around,
    project_l1_ball,
    spherical_projection,
)
from fedsim.attacks.gifd import GIFD, StageRecord, select_best, select_final, stage_steps
from fedsim.attacks.inverting_gradients import InvertingGradients, gradient_distance
from fedsim.attacks.objectives import cosine
from fedsim.data import load_dataset, normalize
from fedsim.defenses.pruning import prune_update
from fedsim.errors import ScenarioError
from fedsim.models import build_model
from fedsim.priors import resolve_prior_path
from fedsim.run import run_scenario
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec, load_scenario, parse_scenario
from fedsim.threat import ClientUpdate

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios" / "attacks"
PRIOR = "mnist-dcgan"


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataSpec(dataset="mnist-5k"))


def digit_update(bundle, idx: int, **kw) -> ClientUpdate:
    """The FedSGD gradient of mnist-5k test image ``idx`` on an untrained ConvNet (width 16, seed 0)."""
    spec = ModelSpec(name="convnet", width=16)
    model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=0)
    return make_update(model, spec, bundle.test_x[[idx]], bundle.test_y[[idx]], bundle, **kw)


def attack(cls, iterations: int, restarts: int = 1, seed: int = 0, knowledge: Knowledge | None = None,
           time_limit_s: float | None = None, **params):
    budget = Budget(iterations=iterations, restarts=restarts, time_limit_s=time_limit_s)
    return cls(cls.Params(prior=PRIOR, **params), knowledge or Knowledge(), budget, torch.device("cpu"), seed)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / F.mse_loss(a, b).item())


def grad_loss_of(images: torch.Tensor, update: ClientUpdate, bundle) -> float:
    """Cosine gradient loss of returned pixel images, recomputed from scratch by the test."""
    from fedsim.attacks.victim import target_gradient, victim_model

    model = victim_model(update)
    x = normalize(images, bundle.mean, bundle.std)
    labels = torch.as_tensor(update.side_info["labels"])
    return gradient_distance(model, x, labels, target_gradient(update, model), cosine, create_graph=False).item()


# --- projections and schedule -------------------------------------------------------------------


def _l1_by_bisection(v: torch.Tensor, r: float) -> torch.Tensor:
    """Reference projection of one vector: soft-threshold at the theta found by bisection on
    ``sum(max(|v| - theta, 0)) = r`` (a different algorithm from Duchi's sort)."""
    if v.abs().sum() <= r:
        return v.clone()
    lo, hi = 0.0, float(v.abs().max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (v.abs() - mid).clamp_min(0).sum() > r else (lo, mid)
    return v.sign() * (v.abs() - (lo + hi) / 2).clamp_min(0)


def test_l1_ball_projection_is_exact_and_per_sample() -> None:
    # A known case: (3, 1) onto the ball of radius 2 is (2, 0); (-3, 1, 0.5) onto radius 1 is (-1, 0, 0).
    out = project_l1_ball(torch.tensor([[3.0, 1.0], [0.5, -0.25]]), 2.0)
    assert torch.allclose(out, torch.tensor([[2.0, 0.0], [0.5, -0.25]]))  # second row is inside: unchanged
    assert torch.allclose(project_l1_ball(torch.tensor([[-3.0, 1.0, 0.5]]), 1.0), torch.tensor([[-1.0, 0, 0]]))
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1, 3, 10, 0.5, 2], dtype=torch.float64).view(-1, 1, 1, 1)
    v = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64) * scales
    r = 20.0
    w = project_l1_ball(v, r)
    assert w.shape == v.shape
    for i in range(len(v)):  # per sample: each one projected on its own, as the reference does
        ref = _l1_by_bisection(v[i].flatten(), r)
        assert torch.allclose(w[i].flatten(), ref, atol=1e-9)
        norm = float(w[i].abs().sum())
        assert norm <= r + 1e-9
        if float(v[i].abs().sum()) > r:
            assert norm == pytest.approx(r, rel=1e-9)  # an outside point lands on the sphere
        else:
            assert torch.equal(w[i], v[i])
    # Optimality: no random point of the ball is closer to v than the projection.
    points = torch.randn(2000, 100, generator=gen, dtype=torch.float64)
    points = project_l1_ball(points, r) * torch.rand(2000, 1, generator=gen, dtype=torch.float64)
    best = (points - v[3].flatten()).norm(dim=1).min()
    assert (w[3].flatten() - v[3].flatten()).norm() <= best
    # Around a centre: v0 + Proj(v - v0), the deviation's L1 norm bounded by r.
    v0 = torch.randn_like(v)
    moved = project_l1_around(v, v0, r)
    assert ((moved - v0).flatten(1).abs().sum(dim=1) <= r + 1e-9).all()
    assert torch.equal(project_l1_around(v0 + 1e-3, v0, r), v0 + 1e-3)  # inside: the point itself
    assert not project_l1_ball(v, 0.0).any()


def test_spherical_projection_restores_each_samples_norm() -> None:
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(5, 64, generator=gen)
    z = z0 * torch.rand(5, 1, generator=gen) * 3 + 0.1 * torch.randn(5, 64, generator=gen)
    out = spherical_projection(z, z0.norm(dim=1))
    assert torch.allclose(out.norm(dim=1), z0.norm(dim=1), rtol=1e-5)
    assert torch.allclose(F.normalize(out, dim=1), F.normalize(z, dim=1), atol=1e-6)  # direction kept


def test_gifd_learning_rate_schedule() -> None:
    assert gifd_lr(0.1, 0.0) == 0.0  # warm-up starts at 0
    assert gifd_lr(0.1, 0.025) == pytest.approx(0.05)  # halfway through the 5 % warm-up
    assert gifd_lr(0.1, 0.05) == pytest.approx(0.1)  # full rate until t = 0.25 ...
    assert gifd_lr(0.1, 0.25) == pytest.approx(0.1)
    assert gifd_lr(0.1, 0.625) == pytest.approx(0.05)  # ... then a half-cosine: half at (1-t)/0.75 = 1/2
    assert gifd_lr(0.1, 1.0) == 0.0
    values = [gifd_lr(1.0, t / 100) for t in range(25, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_latent_kl_is_zero_for_a_standard_gaussian_and_grows_off_it() -> None:
    z = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    assert float(latent_kl(z)) < 1e-3
    assert float(latent_kl(3 * z + 1)) > 1.0


def test_stage_steps_split_the_budget_exactly() -> None:
    assert stage_steps(400, [1, 1, 1, 1]) == [100, 100, 100, 100]
    assert stage_steps(10, [1, 1, 1]) == [4, 3, 3]
    assert stage_steps(100, [2, 1, 1]) == [50, 25, 25]
    assert sum(stage_steps(7, [0.3, 0.3, 0.4])) == 7


def test_select_best_returns_the_image_of_the_best_score() -> None:
    """The final image and its score come from the same (restart, stage): with the best restart first,
    GIFD's reference ``choose_optimal`` would return the LAST restart's image with the best score."""
    records = [StageRecord(restart, stage, loss, torch.full((1, 1, 2, 2), float(10 * restart + stage)), 10)
               for restart, stage, loss in [(0, 0, 0.5), (0, 1, 0.1), (0, 2, 0.3), (1, 0, 0.4), (1, 1, 0.2),
                                            (1, 2, math.nan)]]
    best = select_best(records)
    assert (best.restart, best.stage, best.grad_loss) == (0, 1, 0.1)
    assert torch.equal(best.x, records[1].x)
    assert select_best([StageRecord(0, 0, math.nan, torch.zeros(1), 0)]) is None


# --- the prior -----------------------------------------------------------------------------------


def test_the_shipped_prior_maps_to_the_tasks_normalised_inputs(mnist) -> None:
    update = digit_update(mnist, 0)
    prior = load_attack_prior(GanLatent.Params(prior=PRIOR), update.task, "cpu")
    assert prior.meta.channels == 1 and prior.size == (28, 28)
    x = prior.render(prior.generator.sample_latent(4, torch.Generator().manual_seed(0)))
    pixels = x * prior.std + prior.mean
    assert x.shape == (4, 1, 28, 28) and pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # A task at another resolution gets resized images (area when shrinking).
    task = type(update.task)(**{**update.task.__dict__, "input_shape": (1, 14, 14)})
    small = load_attack_prior(GanLatent.Params(prior=PRIOR), task, "cpu")
    assert small.render(torch.zeros(2, 64)).shape == (2, 1, 14, 14)


# --- the attacks on real digits --------------------------------------------------------------------


def test_gan_latent_recovers_an_unseen_digit(mnist) -> None:
    """mnist-5k test image 3 (its flat mean colour: 9.1 dB), 300 steps x 2 restarts: measured 23.6 dB (gradient
    loss 0.038), label right (Inverting Gradients at 800 steps: 11.6 dB on the same gradient)."""
    update = digit_update(mnist, 3)
    rec = attack(GanLatent, 300, restarts=2).reconstruct(update)
    assert rec.failed is None
    assert rec.images.shape == (1, 1, 28, 28) and 0 <= rec.images.min() and rec.images.max() <= 1
    assert rec.labels.tolist() == mnist.test_y[[3]].tolist()
    assert_beats_trivial(psnr(rec.images, mnist.test_x[[3]]), mnist.test_x[[3]], 10.0, metric=psnr)  # flat: 9.1
    assert rec.stats["restarts"] == 2 and rec.stats["grad_loss"] < 0.06


def test_gifd_beats_latent_only_search_on_the_same_generator(mnist) -> None:
    """Same target (test image 4), generator, seed and steps per stage (100): GIFD's stage 0 IS the
    latent-only search, and the later feature stages lower the gradient loss further. Measured:
    latent only 13.1 dB (loss 0.095), GIFD 42.2 dB (loss 0.0021, best stage 2; stages 0-3: 0.095,
    0.010, 0.0021, 0.0028)."""
    update = digit_update(mnist, 4)
    latent_only = attack(GIFD, 100, stages=1).reconstruct(update)
    full = attack(GIFD, 400).reconstruct(update)
    assert latent_only.failed is None and full.failed is None
    assert full.stats["stage0_grad_loss"] == pytest.approx(latent_only.stats["grad_loss"], abs=1e-6)
    assert full.stats["grad_loss"] <= latent_only.stats["grad_loss"]
    assert full.stats["best_stage"] >= 1
    p_full, p_latent = psnr(full.images, mnist.test_x[[4]]), psnr(latent_only.images, mnist.test_x[[4]])
    assert p_full >= p_latent + 5.0
    assert_beats_trivial(p_full, mnist.test_x[[4]], 20.0, metric=psnr)  # the flat guess scores 10.2 dB
    assert full.labels.tolist() == mnist.test_y[[4]].tolist()


def test_gifd_returns_the_best_record_across_restarts(mnist) -> None:
    """3 restarts on test image 1 with a short budget; the best restart is NOT the last (checked), and the
    returned image's recomputed gradient loss equals the reported one and no stage of any restart beat it.
    Measured: best restart 1 (stage 3), loss 0.0305 recomputed as 0.0305; with the reference bug (the last
    restart's image, the best score) the returned image's loss is 0.068."""
    update = digit_update(mnist, 1)
    rec = attack(GIFD, 80, restarts=3).reconstruct(update)
    assert rec.failed is None and rec.stats["restarts"] == 3
    assert rec.stats["best_restart"] < 2  # precondition: the reference bug would return restart 2's image
    recomputed = grad_loss_of(rec.images, update, mnist)
    assert recomputed == pytest.approx(rec.stats["grad_loss"], abs=2e-3)
    assert rec.stats["grad_loss"] == min(v for k, v in rec.stats.items() if k.startswith("stage"))


def test_progress_counts_all_stages_and_restarts_and_runs_are_deterministic(mnist) -> None:
    update = digit_update(mnist, 2)
    calls: list[tuple[int, int]] = []
    a = attack(GIFD, 40, restarts=2, stage_shares=[2, 1, 1, 1]).reconstruct(update, lambda d, t: calls.append((d, t)))
    b = attack(GIFD, 40, restarts=2, stage_shares=[2, 1, 1, 1]).reconstruct(update)
    assert torch.equal(a.images, b.images) and a.stats["grad_loss"] == b.stats["grad_loss"]
    assert calls[-1] == (80, 80) and all(t == 80 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert a.stats["iterations"] == 40
    calls.clear()
    GanLatent(GanLatent.Params(prior=PRIOR), Knowledge(), Budget(iterations=30, restarts=2), torch.device("cpu"),
              0).reconstruct(update, lambda d, t: calls.append((d, t)))
    assert calls[-1] == (60, 60)


def test_defense_aware_gifd_models_pruning(mnist) -> None:
    """The client prunes 70 % of every gradient tensor (GIFD's pruning defense). With ``knowledge.defense``
    GIFD prunes its dummy gradient the same way before the distance.

    What is asserted is what does not depend on float rounding: the attacker's model of the defense is
    exact (the real image matches the pruned gradient perfectly under it: cosine distance 6e-8; without
    it the real image is 0.024 away), the mode is used only when granted, and both runs recover the digit
    far above a flat guess (9.1 dB). Which of the two wins on one image is a chaotic outcome of 200 steps,
    not a property: on test image 3 aware/unaware measured 33.9/16.1 dB on one machine, 31.5/27.1 here
    with one torch thread and 32.2/24.5 with two; on image 1, 25.3/30.3 and 33.0/29.3."""
    update = digit_update(mnist, 3)
    pruned = prune_update(dict(update.update), 70.0)
    defended = ClientUpdate(update.round, update.partition_id, update.task, update.global_state, pruned,
                            update.num_examples, defenses=({"name": "pruning", "percent": 70.0},))
    from fedsim.attacks.defense_aware import defense_transform
    from fedsim.attacks.victim import target_gradient, victim_model

    model = victim_model(defended)
    modelled = defense_transform(defended.defenses, [n for n, _ in model.named_parameters()])
    x, y = normalize(mnist.test_x[[3]], mnist.mean, mnist.std), mnist.test_y[[3]]
    target = target_gradient(defended, model)
    assert gradient_distance(model, x, y, target, cosine, False, modelled).item() < 1e-5
    assert gradient_distance(model, x, y, target, cosine, False).item() > 0.01
    aware = attack(GIFD, 200, knowledge=Knowledge(defense=True)).reconstruct(defended)
    unaware = attack(GIFD, 200).reconstruct(defended)  # defenses listed, but the knowledge is not granted
    assert aware.failed is None and aware.stats["defenses_modeled"] == 1
    assert unaware.failed is None and "defenses_modeled" not in unaware.stats
    assert aware.labels.tolist() == mnist.test_y[[3]].tolist()
    for rec in (aware, unaware):  # measured 24.5-33.9 dB across machines and thread counts
        assert_beats_trivial(psnr(rec.images, mnist.test_x[[3]]), mnist.test_x[[3]], 10.0, metric=psnr)


def test_batches_and_fedavg_deltas_are_attacked(mnist) -> None:
    """A batch of 3 (one latent/feature per image, L1 balls per image) from a FedAvg delta (cosine
    matches -delta, no hyperparameters needed); known labels are used as granted."""
    spec = ModelSpec(name="convnet", width=16)
    model = build_model(spec, mnist.input_shape, mnist.num_classes, seed=0)
    update = make_update(model, spec, mnist.test_x[:3], mnist.test_y[:3], mnist, protocol="fedavg")
    for cls in (GanLatent, GIFD):
        rec = attack(cls, 12, knowledge=Knowledge(labels="known")).reconstruct(update)
        assert rec.failed is None and rec.images.shape == (3, 1, 28, 28)
        assert rec.labels.tolist() == mnist.test_y[:3].tolist()


# --- robustness and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GanLatent, GIFD])
@pytest.mark.parametrize("case", BROKEN_UPDATES)
def test_broken_updates_fail_with_a_reason(mnist, cls, case) -> None:
    update = broken_update(digit_update(mnist, 0), case)
    rec = attack(cls, 5).reconstruct(update)
    assert rec.failed and rec.images is None
    expected = {"nan": "NaN", "zero": "all zeros", "none": "no update", "shape": "shape", "missing": "no entry"}
    assert expected[case] in rec.failed


def test_unfit_prior_budget_or_stages_fail_with_a_reason(mnist) -> None:
    cifar = load_dataset(DataSpec(dataset="cifar10-mini"))
    spec = ModelSpec(name="convnet", width=8)
    model = build_model(spec, cifar.input_shape, cifar.num_classes, seed=0)
    colour = make_update(model, spec, cifar.train_x[:1], cifar.train_y[:1], cifar)
    rec = attack(GIFD, 5).reconstruct(colour)
    assert rec.failed and "1-channel" in rec.failed and "3 channels" in rec.failed
    assert "budget.iterations is 0" in attack(GanLatent, 0).reconstruct(digit_update(mnist, 0)).failed
    assert "4 blocks" in attack(GIFD, 5, stages=6).reconstruct(digit_update(mnist, 0)).failed
    missing = GIFD(GIFD.Params(prior="/nonexistent/prior.pt"), Knowledge(), Budget(iterations=5),
                   torch.device("cpu"), 0).reconstruct(digit_update(mnist, 0))
    assert missing.failed and "not found" in missing.failed
    timed = attack(GIFD, 10_000, time_limit_s=0.5).reconstruct(digit_update(mnist, 0))
    assert timed.failed is None and timed.stats["time_limited"] == 1.0


def test_parameters_are_validated_with_their_field_path(tiny_raw) -> None:
    with pytest.raises(ValueError, match="3 radii"):
        GIFD.Params(stages=4, radii=[1.0])
    with pytest.raises(ValueError, match="stage_shares"):
        GIFD.Params(stages=2, stage_shares=[1.0])
    raw = {**tiny_raw, "attacks": [{"name": "gifd", "params": {"prior": "no-such-prior"}}]}
    with pytest.raises(ScenarioError, match=r"attacks\[0\].*params.prior.*not found.*mnist-dcgan"):
        parse_scenario(raw)
    raw = {**tiny_raw, "attacks": [{"name": "gan_latent", "params": {"radii": [1]}}]}
    with pytest.raises(ScenarioError, match=r"attacks\[0\].params"):
        parse_scenario(raw)
    raw = {**tiny_raw, "federation": {**tiny_raw["federation"], "protocol": "fedavg"},
           "attacks": [{"name": "gan_latent", "params": {"distance": "l2"}}]}
    with pytest.raises(ScenarioError, match=r"attacks\[0\].*local_hparams"):
        parse_scenario(raw)
    raw["attacks"][0]["knowledge"] = {"local_hparams": True, "auxiliary_data": True}  # SoK threat model D
    assert parse_scenario(raw).attacks[0].params["distance"] == "l2"


def test_scenario_files_validate_and_the_gifd_scenario_runs() -> None:
    for name in ("gan_latent", "gifd", "gan_prior_comparison"):
        scenario = load_scenario(SCENARIOS / f"{name}.yaml")
        assert scenario.data.dataset == "mnist-5k" and scenario.data.train_subset == 2000
        assert {a.name for a in scenario.attacks} & {"gan_latent", "gifd"}
        assert all(a.params.get("prior", PRIOR) == PRIOR for a in scenario.attacks if a.name != "inverting_gradients")
    assert resolve_prior_path(PRIOR).is_file()
    scenario = load_scenario(SCENARIOS / "gifd.yaml", ["attacks.0.budget.iterations=8", "attacks.0.budget.restarts=1"])
    result = run_scenario(scenario, write=False, backend="inprocess")
    (outcome,) = result.outcomes
    assert outcome.failed is None and outcome.attack == "gifd"
    assert outcome.stats["iterations"] == 8 and "psnr" in str(outcome.metrics)


@pytest.mark.slow
def test_comparison_ig_latent_gifd_on_several_digits(mnist) -> None:
    """800 steps each, 1 restart, test images 0-5 (65 s). Measured PSNR per image: IG 13.0, 16.5, 14.7,
    11.6, 11.8, 10.0 (mean 12.9 dB); gan_latent 10.5, 23.6, 15.2, 26.4, 29.7, 11.0 (mean 19.4 dB); GIFD
    35.0, 34.0, 39.1, 42.5, 43.4, 44.1 (mean 39.7 dB), above the latent search on every image."""
    results = {"ig": [], "lat": [], "gifd": []}
    for idx in range(6):
        update = digit_update(mnist, idx)
        ig = InvertingGradients(InvertingGradients.Params(), Knowledge(), Budget(iterations=800),
                                torch.device("cpu"), 0).reconstruct(update)
        lat = attack(GanLatent, 800).reconstruct(update)
        gifd = attack(GIFD, 800).reconstruct(update)
        for key, rec in (("ig", ig), ("lat", lat), ("gifd", gifd)):
            results[key].append(psnr(rec.images, mnist.test_x[[idx]]))
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    flat = sum(trivial_score(mnist.test_x[[idx]], psnr)[0] for idx in range(6)) / 6  # 9.7 dB
    assert mean["gifd"] >= flat + 20 and mean["lat"] >= flat + 5 and mean["gifd"] >= mean["lat"] + 10 >= mean["ig"] + 10
    assert all(g >= la for g, la in zip(results["gifd"], results["lat"], strict=True))


@pytest.mark.parametrize("train_subset", [3000, None])
def test_a_prior_trained_on_the_clients_images_is_refused(train_subset: int | None) -> None:
    """mnist-dcgan learned from mnist-5k train examples 2000..3999: clients holding any of them would hand
    the attack their own images through the prior (an unlabelled oracle), so validation refuses."""
    for name in ("gifd.yaml", "gan_latent.yaml", "model_inversion.yaml"):
        path = ROOT / "scenarios" / "attacks" / name
        assert load_scenario(path)  # the shipped split (clients 0..1999) is fine
        with pytest.raises(ScenarioError, match=r"params\.prior: 'mnist-dcgan' was trained on mnist-5k train "
                                                r"examples 2000\.\.3999.*overlap the clients' data"):
            load_scenario(path, [f"data.train_subset={'null' if train_subset is None else train_subset}"])


def test_gifd_ranks_pruned_restarts_only_when_no_survivor_is_usable() -> None:
    """Restart 1 was pruned mid-stage with a lower loss (0.05) than survivor 0's best stage end (0.2): the
    survivor's record is the result. With the survivor diverged, the pruned record is, and the flag says so."""
    x = torch.zeros(1, 1, 2, 2)
    survivor = [StageRecord(0, 0, 0.3, x, 10), StageRecord(0, 1, 0.2, x, 10)]
    pruned = [StageRecord(1, 0, 0.05, x, 4)]
    best, flagged = select_final(survivor + pruned, {1})
    assert (best.restart, best.stage, best.grad_loss, flagged) == (0, 1, 0.2, False)
    diverged = [StageRecord(0, 0, math.nan, x, 10)]
    best, flagged = select_final(diverged + pruned, {1})
    assert (best.restart, best.grad_loss, flagged) == (1, 0.05, True)
    assert select_final(diverged, {1}) == (None, False)
