"""Scoring at scale (issue 14, item 4): exact recovery of a subset, fewer/more images than the batch, fast matrices.

Expected values come from brute force written out here (numpy PSNR per pair, every permutation of small
batches, LPIPS pair by pair), never from the scorer's own helpers.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from fedsim.attacking import judge
from fedsim.metrics import EXACT_PSNR_DB, FRAC_EXACT_KEY, NUM_EXACT_KEY, get_lpips, score_reconstruction
from fedsim.threat import GroundTruth, Reconstruction

CAP = 100.0  # the scorer's PSNR cap, restated (fedsim.metrics.image.PSNR_CAP_DB)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _truth(x: torch.Tensor) -> GroundTruth:
    return GroundTruth(round=1, partition_id=0, inputs=x, labels=torch.zeros(len(x), dtype=torch.long))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of one pair in [0, 1], written out (float64, capped at CAP dB like the scorer)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return CAP if mse <= 10 ** (-CAP / 10) else min(CAP, 10 * math.log10(1 / mse))


def _digits(n: int, seed: int) -> torch.Tensor:
    """MNIST-like 28x28 gray images: mostly black with a bright random blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        r, c = torch.randint(4, 20, (2,), generator=g).tolist()
        x[i, 0, r:r + 8, c:c + 6] = torch.rand(8, 6, generator=g) * 0.5 + 0.5
    return x


def test_forty_exact_of_sixty_four_scores_the_missing_as_misses_and_is_not_oracle():
    x = _digits(64, seed=1)
    keep = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:40]
    out = score_reconstruction(Reconstruction(images=x[keep].clone(), labels=None), _truth(x), lpips=False)
    missing = sorted(set(range(64)) - set(keep.tolist()))
    blind = [_psnr(np.full((1, 28, 28), 0.5), x[i].numpy()) for i in missing]
    assert out[NUM_EXACT_KEY] == 40 and out[FRAC_EXACT_KEY] == pytest.approx(40 / 64)
    assert out["psnr_mean"] == pytest.approx((40 * CAP + sum(blind)) / 64, abs=1e-3)  # not 100: missing count
    assert [out["order"][i] for i in missing] == [-1] * 24
    oracle, reasons, _, metrics = judge(out, asked=64)
    assert not oracle and reasons == () and "count_mismatch" not in metrics


def test_a_missing_image_never_counts_even_when_the_blind_guess_matches_it():
    x = _digits(6, seed=3)
    x[4:] = 0.5  # two true images that ARE the blind-guess gray
    out = score_reconstruction(Reconstruction(images=x[:3].clone(), labels=None), _truth(x), lpips=False)
    assert out["psnr_per_image"][4] == pytest.approx(CAP)  # scored against gray: identical ...
    assert out[NUM_EXACT_KEY] == 3 and out[FRAC_EXACT_KEY] == pytest.approx(3 / 6)  # ... but not recovered


def _brute_force(recon: np.ndarray, truth: np.ndarray) -> tuple[int, float]:
    """(most pairs above 40 dB, mean PSNR of the least-MSE assignment among those), over every permutation."""
    psnr = np.array([[_psnr(r, t) for t in truth] for r in recon])
    mse = np.array([[np.mean((r.astype(np.float64) - t) ** 2) for t in truth] for r in recon])
    best = None
    for perm in itertools.permutations(range(len(recon))):
        cols = np.arange(len(truth))
        key = (-int((psnr[list(perm), cols] > EXACT_PSNR_DB).sum()), float(mse[list(perm), cols].sum()))
        if best is None or key < best[0]:
            best = (key, float(psnr[list(perm), cols].mean()))
    return -best[0][0], best[1]


def test_matching_never_pairs_an_exact_recovery_away():
    """Squared distances obey no triangle inequality: least total MSE can swap an exact pair for two bad ones."""
    t = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    r = torch.tensor([0.5, 0.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()  # r0 == t0 exactly
    out = score_reconstruction(Reconstruction(images=r, labels=None), _truth(t), lpips=False)
    assert out["order"] == [0, 1] and out[NUM_EXACT_KEY] == 1  # least MSE would pair [1, 0]: 0.25 + 0.25 < 1
    # a random batch of 6 with 3 exact recoveries and 3 decoys pushed away from the exact images' neighbours
    g = torch.Generator().manual_seed(5)
    for trial in range(5):
        truth = torch.rand(6, 1, 4, 4, generator=g)
        recon = truth.clone()[torch.randperm(6, generator=g)]
        for i in (1, 3, 5):  # decoy: beyond recon[i-1] as seen from truth[i]: cheaper to pair crosswise
            recon[i] = (2 * recon[i - 1] - truth[torch.randint(0, 6, (1,), generator=g)]).clamp(0, 1)
        out = score_reconstruction(Reconstruction(images=recon, labels=None), _truth(truth), lpips=False)
        count, mean = _brute_force(recon.numpy(), truth.numpy())
        assert out[NUM_EXACT_KEY] == count, f"trial {trial}"
        assert out["psnr_mean"] == pytest.approx(mean, abs=1e-3), f"trial {trial}"


def test_surplus_images_pay_in_the_fraction_and_only_unasked_surplus_is_oracle():
    x = _digits(16, seed=7)
    extra = torch.cat([x.flip(0), torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(8))])
    out = score_reconstruction(Reconstruction(images=extra, labels=None), _truth(x), lpips=False)
    assert out[NUM_EXACT_KEY] == 16 and out["surplus_images"] == 4
    assert out[FRAC_EXACT_KEY] == pytest.approx(16 / 20)  # each surplus image counts as one miss
    assert out[f"{FRAC_EXACT_KEY}_selected"] == pytest.approx(1.0)
    oracle, reasons, _, _ = judge(dict(out), asked=16)  # more than the view declared: the truth selected
    assert oracle and "selection" in reasons[0]
    oracle, _, _, metrics = judge(dict(out), asked=20)  # the declared count (DP-SGD's expected batch)
    assert not oracle and metrics["count_mismatch"] and metrics[FRAC_EXACT_KEY] == pytest.approx(16 / 20)


def test_lpips_matrix_equals_lpips_of_every_pair():
    scorer = get_lpips()
    if scorer is None:
        pytest.skip("LPIPS AlexNet backbone not available offline")
    g = torch.Generator().manual_seed(9)
    for shape in ((1, 28, 28), (3, 32, 32)):
        a, b = torch.rand(5, *shape, generator=g), torch.rand(4, *shape, generator=g)
        b[1] = a[2]  # one identical pair: the matrix must give ~0, not a cancellation residue
        pairs = scorer(a.repeat_interleave(4, 0), b.repeat(5, 1, 1, 1)).view(5, 4)  # every pair, one by one
        matrix = scorer.matrix(a, b)
        assert matrix.shape == (5, 4) and torch.allclose(matrix, pairs, atol=1e-5)
        assert float(matrix[2, 1]) < 1e-6
        # scored with LPIPS matching and one image missing: each pair's LPIPS, one by one, the missing one vs gray
        out = score_reconstruction(Reconstruction(images=b[:3], labels=None), _truth(a[:4]), match="lpips")
        order = out["order"]
        assert out["matched_by"] == "lpips" and sorted(order) == [-1, 0, 1, 2]
        each = [float(scorer(b[j:j + 1] if j >= 0 else torch.full_like(a[i:i + 1], 0.5), a[i:i + 1]))
                for i, j in enumerate(order)]
        assert out["lpips_mean"] == pytest.approx(sum(each) / 4, abs=1e-5)


# ---------------------------------------------------------------- the fraction in every output


def _bench_with_and_without_fraction(root):
    """A bench dir of two hand-written cells: one recorded with the fraction, one before it existed."""
    def record(cell_id: str, defense: str, summary: dict) -> dict:
        return {"cell_id": cell_id, "attack": "imprint", "defense": defense, "params": {}, "repeat": 0, "seed": 1,
                "status": "ok", "error": None, "seconds": 1.0, "run_dir": None,
                "summary": {"attacks_failed": 0, "test_accuracy": 0.5, "epsilon": None, "rounds": 1, **summary}}

    root.mkdir()
    (root / "grid.yaml").write_text("name: exact-grid\nrepeats: 1\n")
    lines = [record("new", "none", {"psnr_mean": 70.0, FRAC_EXACT_KEY: 0.75}),
             record("old", "dp_sgd", {"psnr_mean": 12.0})]
    (root / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_leaderboard_and_report_show_the_fraction_and_old_cells_still_render(tmp_path):
    import csv

    from fedsim.report.html import render_report

    bench = _bench_with_and_without_fraction(tmp_path / "bench")
    doc = render_report(bench).read_text()
    assert "share &gt; 40 dB" in doc or "share > 40 dB" in doc
    assert "0.75" in doc and "12.00" in doc  # the old cell's row is there, its fraction cell empty
    rows = {r["defense"]: r for r in csv.DictReader((bench / "report" / "leaderboard.csv").open())}
    assert float(rows["none"][f"{FRAC_EXACT_KEY}_mean"]) == 0.75 and rows["dp_sgd"][f"{FRAC_EXACT_KEY}_mean"] == ""


def test_run_outputs_carry_the_fraction_beside_mean_psnr(tmp_path, tiny_raw):
    from fedsim.bench.store import summarize_run
    from fedsim.report.loading import summarize_metrics
    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    result = run_scenario(parse_scenario(tiny_raw), tmp_path / "run")
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    scored = metrics["attacks"][0]["metrics"]
    psnr = np.array(scored["psnr_per_image"])
    assert scored[NUM_EXACT_KEY] == int((psnr > EXACT_PSNR_DB).sum())  # 5 IG steps: 0, but the key is there
    assert scored[FRAC_EXACT_KEY] == pytest.approx(scored[NUM_EXACT_KEY] / scored["batch_size"])
    summary = (result.out_dir / "summary.md").read_text()
    assert "recovered > 40 dB" in summary and f"({scored[NUM_EXACT_KEY]}/{scored['batch_size']})" in summary
    assert summarize_run(metrics)[FRAC_EXACT_KEY] == pytest.approx(scored[FRAC_EXACT_KEY])
    gallery = f"{scored[NUM_EXACT_KEY]}/{scored['batch_size']} "
    assert gallery + "&gt; 40 dB" in (result.out_dir / "report.html").read_text()
    for outcome in metrics["attacks"]:  # a metrics.json written before issue 14
        outcome["metrics"].pop(FRAC_EXACT_KEY)
        outcome["metrics"].pop(NUM_EXACT_KEY)
    assert FRAC_EXACT_KEY not in summarize_run(metrics) and FRAC_EXACT_KEY not in summarize_metrics(metrics)
    (result.out_dir / "metrics.json").write_text(json.dumps(metrics))
    from fedsim.report.html import render_report

    assert "mean PSNR" in render_report(result.out_dir, tmp_path / "old.html").read_text()


# ---------------------------------------------------------------- batches of 64 / 16 from the bundled sets


@pytest.mark.parametrize(("dataset", "batch", "bins"), [("mnist-5k", 64, 256), ("cifar10-mini", 16, 64)])
def test_one_client_gets_the_whole_batch_from_the_bundled_sets(tmp_path, dataset, batch, bins):
    """docs/batches_at_scale.md: one client, FedSGD, batch 64 of mnist-5k's 4000 training digits and batch 16 of
    cifar10-mini's 16 training images (20, the last 4 held out by test_fraction 0.2) reach the attack whole."""
    import yaml

    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    raw = yaml.safe_load(open("scenarios/attacks/robbing_the_fed.yaml"))
    raw.update(device="cpu", backend={"kind": "inprocess"}, data={"dataset": dataset, "partition": {"kind": "iid"},
                                                                   "test_fraction": 0.2})
    raw["federation"].update(clients=1, local={"batch_size": batch, "lr": 0.1})
    raw["attacks"][0]["params"]["bins"] = bins
    outcome = json.loads((run_scenario(parse_scenario(raw), tmp_path / "run").out_dir / "metrics.json").read_text())
    scored = outcome["attacks"][0]["metrics"]
    assert scored["batch_size"] == batch and len(scored["psnr_per_image"]) == batch
    assert scored[NUM_EXACT_KEY] == sum(p > EXACT_PSNR_DB for p in scored["psnr_per_image"])


def test_surplus_labels_beyond_the_asked_count_are_oracle_like_surplus_images():
    """A label-only attack returning more labels than the view asked for was scored by a selection too."""
    truth = GroundTruth(round=1, partition_id=0, inputs=torch.rand(4, 1, 8, 8), labels=torch.tensor([0, 1, 2, 3]))
    out = score_reconstruction(Reconstruction(images=None, labels=torch.tensor([0, 1, 2, 3, 4, 5])), truth)
    assert out["label_acc"] == pytest.approx(4 / 6)
    assert judge(dict(out), asked=4)[0] is True  # 6 labels for the 4 the view declared
    assert judge(dict(out), asked=6)[0] is False  # the declared count itself (DP-SGD's expected batch)


# ---------------------------------------------------------------- best-of keys, shown counts, "ran, isolated nothing"


def _near_gray(n: int, seed: int) -> torch.Tensor:
    """Images close to the blind-guess gray (0.5 +- 0.05): the gray guess scores far above any noise image."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * (torch.rand(n, 3, 8, 8, generator=g) - 0.5)


def test_best_keys_come_from_the_attacks_images_never_from_the_blind_guess():
    """One noise image for a batch of 6: ``*_best`` is that image's score against its matched truth (brute force:
    the truth of least MSE), not the gray guess's score for a missing truth (which is higher here)."""
    x = _near_gray(6, seed=11)
    noise = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    out = score_reconstruction(Reconstruction(images=noise, labels=None), _truth(x), lpips=False)
    mse = [float(np.mean((noise[0].numpy().astype(np.float64) - t.numpy()) ** 2)) for t in x]
    j = int(np.argmin(mse))
    gray = [_psnr(np.full((3, 8, 8), 0.5), t.numpy()) for i, t in enumerate(x) if i != j]
    assert max(gray) > _psnr(noise[0].numpy(), x[j].numpy()) + 10  # the gray guess would win by far
    assert out["psnr_best"] == pytest.approx(_psnr(noise[0].numpy(), x[j].numpy()), abs=1e-3)
    assert out["mse_best"] == pytest.approx(mse[j], rel=1e-4)
    assert out["psnr_mean"] == pytest.approx((_psnr(noise[0].numpy(), x[j].numpy()) + sum(gray)) / 6, abs=1e-3)


def test_an_empty_reconstruction_is_a_measured_zero_with_blind_guess_means_and_no_best():
    """An attack that ran and isolated nothing returns (0, C, H, W): 0 of B above 40 dB, every truth scored against
    gray in the means, no ``*_best`` (no image was produced), not failed and not oracle."""
    x = _near_gray(5, seed=13)
    out = score_reconstruction(Reconstruction(images=torch.empty(0, 3, 8, 8), labels=None), _truth(x), lpips=False)
    assert "failed" not in out and out["num_reconstructed"] == 0 and out["order"] == [-1] * 5
    assert out[NUM_EXACT_KEY] == 0 and out[FRAC_EXACT_KEY] == 0.0
    assert not [k for k in out if k.endswith("_best")]
    gray = [_psnr(np.full((3, 8, 8), 0.5), t.numpy()) for t in x]
    assert out["psnr_mean"] == pytest.approx(sum(gray) / 5, abs=1e-3)
    oracle, reasons, _, _ = judge(dict(out), asked=5)
    assert not oracle and reasons == ()
    with_lpips = score_reconstruction(Reconstruction(images=torch.empty(0, 3, 8, 8), labels=None), _truth(x),
                                      lpips=True, match="lpips")  # the LPIPS matrix of 0 rows, too
    assert "failed" not in with_lpips and not [k for k in with_lpips if k.endswith("_best")]


def test_the_count_shown_beside_the_fraction_divides_to_it(tmp_path, capsys):
    """16 exact + 4 surplus images: the fraction is 16/20, so every count beside it (summary.md, report.html's
    gallery, the CLI line) says 16/(16+4), never 16/16 next to 0.80."""
    from types import SimpleNamespace

    from fedsim.cli import _print_result
    from fedsim.report.gallery import GalleryEntry
    from fedsim.report.html import _gallery
    from fedsim.report.summary import _exact

    x = _digits(16, seed=7)
    extra = torch.cat([x.flip(0), torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(8))])
    _, _, _, m = judge(score_reconstruction(Reconstruction(images=extra, labels=None), _truth(x), lpips=False),
                       asked=16)
    assert m[FRAC_EXACT_KEY] == pytest.approx(16 / 20)
    pixels = (x.numpy() * 255).astype(np.uint8), (extra.numpy() * 255).astype(np.uint8)
    entry = GalleryEntry(attack="a", round=1, client=0, truth=pixels[0], reconstruction=pixels[1],
                         order=m["order"], psnr_per_image=m["psnr_per_image"], metrics=m)
    outcome = SimpleNamespace(attack="a", oracle=True, round=1, partition_id=0, failed=None, metrics=m,
                              oracle_labels=False, seconds=0.1)
    _print_result(SimpleNamespace(history=[], client_failures=[], outcomes=[outcome], out_dir=None,
                                  timing={"federation_s": 0.0, "attacks_s": 0.0}))
    shown = {"summary.md": _exact(m), "report.html": _gallery(entry, "a", tmp_path, 0), "cli": capsys.readouterr().out}
    for where, text in shown.items():
        assert "16/(16+4)" in text and "16/16" not in text, (where, text)


def test_dp_sgd_against_robbing_the_fed_is_a_measured_zero_not_a_failed_attack(tmp_path):
    """Robbing the Fed under DP-SGD (sigma 1) through the federation: the attack ran, no bin isolated an input; the
    outcome is 0 of 16 above 40 dB (not "failed"), its stats say why, summary.md shows 0.00 (0/16)."""
    import yaml

    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    raw = yaml.safe_load(open("scenarios/attacks/robbing_the_fed.yaml"))
    raw.update(device="cpu", backend={"kind": "inprocess"},
               defenses=[{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                                        "poisson": False}}])
    raw["federation"].update(clients=2, local={"batch_size": 16, "lr": 0.1})
    result = run_scenario(parse_scenario(raw), tmp_path / "run")
    (outcome,) = result.outcomes
    assert outcome.failed is None, outcome.failed
    m = outcome.metrics
    assert m[NUM_EXACT_KEY] == 0 and m[FRAC_EXACT_KEY] == 0.0 and "psnr_best" not in m
    assert "none isolated an input" in outcome.stats["nothing_isolated"]
    truth = outcome.truth.numpy()
    gray = [_psnr(np.full(t.shape, 0.5), t) for t in truth]
    assert m["psnr_mean"] == pytest.approx(sum(gray) / len(gray), abs=1e-3)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["attacks"][0]["failed"] is None and metrics.get("attacks_failed", 0) == 0
    summary = (result.out_dir / "summary.md").read_text()
    (row,) = [line for line in summary.splitlines() if line.startswith("| robbing_the_fed")]
    assert "| 0.00 (0/16) |" in row and "failed" not in row, row
    assert "nothing recovered" in summary and "none isolated an input" in summary
    assert "none isolated an input" in (result.out_dir / "report.html").read_text()
    assert (result.out_dir / "report.html").is_file()


def test_trap_weights_that_isolate_nothing_return_the_empty_reconstruction():
    """Trap weights ran on the model they sent, but no neuron fired for a single input: (a) no first-layer neuron
    has a gradient (zeroed update), (b) every neuron's ratio is noise outside the pixel box (the first layer's
    gradient replaced by DP-like noise). Both are a measured 0 of 8 (an empty (0, 1, 28, 28) reconstruction whose
    stats say why), scored 0/8, never a failed attack."""
    import dataclasses

    from helpers import make_update

    from fedsim.attacks.trap_weights import TrapWeights
    from fedsim.data import load_dataset
    from fedsim.models import build_model
    from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec
    from fedsim.threat import ManipulationView

    mnist = load_dataset(DataSpec(dataset="mnist-5k"))
    x, y = mnist.train_x[:8], mnist.train_y[:8]
    spec = ModelSpec(name="fc10", activation="relu")
    attack = TrapWeights(TrapWeights.Params(calibrate="none"), Knowledge(), Budget(iterations=1),
                         torch.device("cpu"), 0)
    model = build_model(spec, mnist.input_shape, mnist.num_classes, seed=0)
    honest = make_update(model, spec, x, y, mnist)
    model.load_state_dict(dict(attack.manipulate(ManipulationView(1, honest.task, honest.global_state, (0,))).state))
    update = make_update(model, spec, x, y, mnist)
    first = next(k[: -len(".weight")] for k, v in update.update.items() if k.endswith(".weight") and v.ndim == 2)
    g = torch.Generator().manual_seed(3)
    for why, change in (("none has a gradient", torch.zeros_like),
                        ("none for a single input", lambda t: torch.randn(t.shape, generator=g))):
        grads = {**update.update, **{f"{first}.{p}": change(update.update[f"{first}.{p}"]) for p in ("weight", "bias")}}
        rec = attack.reconstruct(dataclasses.replace(update, update=grads))
        assert rec.failed is None and tuple(rec.images.shape) == (0, 1, 28, 28), (why, rec.failed)
        assert why in rec.stats["nothing_isolated"]
        out = score_reconstruction(rec, _truth(x), lpips=False)
        assert "failed" not in out and out[NUM_EXACT_KEY] == 0 and out[FRAC_EXACT_KEY] == 0.0
