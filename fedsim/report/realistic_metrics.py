"""Per-cell numbers the realistic-training section adds beside the evaluator's: a shift-tolerant PSNR and the test
accuracy of the model the attack inverted.

* **Best-shift PSNR** (augmentation axis): under ``flip_crop`` (fedsim/augment.py) the client trains on randomly
  shifted (and, on mirror-invariant datasets, mirrored) copies of its images, so a perfect reconstruction of what the
  gradient saw is off by up to ``pad`` pixels from the private image and loses many dB on 8x8 digits for the shift
  alone. The best-shift PSNR of a true image is the highest PSNR of its matched reconstruction against every image
  the augmentation could have made from it: each of the (2 pad + 1)^2 crops of the zero-padded image (and their
  mirrors when the dataset flips). It is an upper bound on the raw PSNR (the centred crop is among the candidates)
  and is computed for every cell, augmented or not, so that the two columns compare like with like.
* **Attacked model's accuracy**: metrics.json's evaluation of the global model the client received in the attacked
  round (round r - 1's row; round 0 is the initial model), not the final model after the client's update.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.augment import augmentation_for
from fedsim.metrics.image import PSNR_CAP_DB
from fedsim.report.loading import read_yaml


def shift_tolerant_psnr(truth: np.ndarray, recon: np.ndarray, order: np.ndarray | None, pad: int,
                        flip: bool = False, cap: float = PSNR_CAP_DB) -> np.ndarray:
    """Per true image, the best PSNR (dB, data range 1) of its matched reconstruction over the augmentation's outputs.

    ``truth``: N x C x H x W and ``recon``: M x C x H x W in [0, 1]; ``order[i]``: the reconstruction matched to true
    image i (-1: none; None: the identity). ``pad``: the crop's zero padding in pixels (offsets in [0, 2 pad]^2);
    ``flip``: also the left-right mirrors. Returns N floats, NaN where image i has no reconstruction; capped at
    ``cap`` like :func:`fedsim.metrics.image.psnr_per_image`."""
    t = np.asarray(truth, dtype=np.float64)
    r = np.asarray(recon, dtype=np.float64)
    n, _, h, w = t.shape
    idx = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)[:n]
    valid = (idx >= 0) & (idx < len(r))
    padded = np.pad(t, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    variants = [padded[:, :, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    if flip:
        variants += [v[..., ::-1] for v in variants]
    matched = r[np.where(valid, idx, 0)]
    mse = np.stack([((v - matched) ** 2).mean(axis=(1, 2, 3)) for v in variants], axis=1).min(axis=1)
    psnr = np.minimum(10.0 * np.log10(1.0 / np.maximum(mse, 10.0 ** (-cap / 10.0))), cap)
    return np.where(valid, psnr, np.nan)


def best_shift_psnr(run_dir: Path | None) -> float | None:
    """Mean best-shift PSNR of one cell's first attack outcome, from its reconstructions.npz (uint8 images, at most
    64; the 1/255 rounding moves a PSNR by far less than 0.1 dB at these errors) and the crop of ``flip_crop`` on
    the dataset of the cell's scenario.yaml; None when the images are not stored."""
    if run_dir is None or not (run_dir / "reconstructions.npz").is_file():
        return None
    with np.load(run_dir / "reconstructions.npz", allow_pickle=False) as arrays:
        if "truth_0" not in arrays or "recon_0" not in arrays:
            return None
        truth = arrays["truth_0"].astype(np.float64) / 255.0
        recon = arrays["recon_0"].astype(np.float64) / 255.0
        order = arrays["order_0"] if "order_0" in arrays else None
    if truth.ndim != 4 or recon.ndim != 4 or len(truth) == 0:
        return None
    scenario = read_yaml(run_dir / "scenario.yaml") or {}
    data = scenario.get("data") if isinstance(scenario.get("data"), dict) else {}
    dataset = str(data.get("dataset", ""))  # unknown: no mirror (the crop alone)
    aug = augmentation_for("flip_crop", dataset, tuple(truth.shape[1:]))
    assert aug is not None  # flip_crop on an image always has one
    per = shift_tolerant_psnr(truth, recon, order, aug.pad, aug.flip)
    per = per[np.isfinite(per)]
    return float(per.mean()) if len(per) else None


def attacked_model_accuracy(metrics: dict[str, Any]) -> float | None:
    """Test accuracy of the global model the first attack inverted: the ``utility`` row of round (attacked round
    - 1) in metrics.json (round 0: the initial model); None when that round was not evaluated."""
    attacks = [a for a in metrics.get("attacks") or [] if isinstance(a, dict)]
    if not attacks or not isinstance(attacks[0].get("round"), int):
        return None
    sent = attacks[0]["round"] - 1
    for row in metrics.get("utility") or []:
        if isinstance(row, dict) and row.get("round") == sent and isinstance(row.get("test_accuracy"), int | float):
            value = float(row["test_accuracy"])
            return value if math.isfinite(value) else None
    return None
