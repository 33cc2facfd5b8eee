"""The realistic section's best-shift PSNR and attacked-model accuracy (fedsim/report/realistic_metrics.py).

Kinds guarded here (expected values worked out by hand on one-pixel images, never produced by the code under test):

* the best-shift PSNR forgives exactly the shifts (and, on flipping datasets, the mirrors) the crop can make and
  nothing more: a reconstruction one pixel off scores the cap, two pixels off (pad 1) scores the hand-computed
  PSNR of the remaining one-pixel miss, a mirror is forgiven only when the dataset flips; an unmatched image is NaN;
* the model-state table reports the test accuracy of the model the attack inverted (round r - 1), not the final one;
* the augmentation table shows the best-shift PSNR beside the raw one, with its own direction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.report.loading import load_source
from fedsim.report.realistic import realistic_markdown
from fedsim.report.realistic_metrics import attacked_model_accuracy, best_shift_psnr, shift_tolerant_psnr

ONE_PIXEL_MISS = 10 * math.log10(64 / 2)  # 8x8 images, one white pixel in the wrong place: MSE = 2 / 64


def _dot(row: int, col: int) -> np.ndarray:
    """A 1 x 1 x 8 x 8 black image with one white pixel."""
    img = np.zeros((1, 1, 8, 8))
    img[0, 0, row, col] = 1.0
    return img


def test_a_one_pixel_shift_is_forgiven_and_a_two_pixel_shift_is_not() -> None:
    truth = _dot(3, 3)
    one, two = _dot(3, 4), _dot(5, 3)
    assert shift_tolerant_psnr(truth, one, None, pad=1)[0] == 100.0  # an exact match after the shift: the cap
    assert shift_tolerant_psnr(truth, _dot(2, 2), None, pad=1)[0] == 100.0  # up-left: the other end of the crop
    assert abs(shift_tolerant_psnr(truth, two, None, pad=1)[0] - ONE_PIXEL_MISS) < 1e-9  # best: one row off
    assert shift_tolerant_psnr(truth, two, None, pad=2)[0] == 100.0  # a wider crop reaches it
    assert shift_tolerant_psnr(truth, truth, None, pad=1)[0] == 100.0  # the centred crop is a candidate


def test_a_mirror_is_forgiven_only_when_the_dataset_flips() -> None:
    truth, mirrored = _dot(2, 1), _dot(2, 6)  # 8 - 1 - 1 = 6
    assert abs(shift_tolerant_psnr(truth, mirrored, None, pad=1)[0] - ONE_PIXEL_MISS) < 1e-9  # 5 columns apart
    assert shift_tolerant_psnr(truth, mirrored, None, pad=1, flip=True)[0] == 100.0


def test_the_matching_order_is_followed_and_a_missing_match_is_nan() -> None:
    truth = np.concatenate([_dot(3, 3), _dot(6, 6)])
    recon = np.concatenate([_dot(6, 7), _dot(3, 3)])  # swapped: truth 0 <- recon 1, truth 1 <- recon 0 (shifted)
    got = shift_tolerant_psnr(truth, recon, np.array([1, 0]), pad=1)
    assert got.tolist() == [100.0, 100.0]
    got = shift_tolerant_psnr(truth, recon, np.array([1, -1]), pad=1)
    assert got[0] == 100.0 and math.isnan(got[1])


def _run(root: Path, name: str, truth: np.ndarray, recon: np.ndarray, *, dataset: str = "digits",
         utility: list[dict[str, Any]] | None = None, attack_round: int = 1) -> Path:
    run = root / "cells" / name
    run.mkdir(parents=True)
    np.savez(run / "reconstructions.npz", truth_0=(truth * 255).astype(np.uint8),
             recon_0=(recon * 255).astype(np.uint8), order_0=np.arange(len(truth)))
    (run / "scenario.yaml").write_text(yaml.safe_dump({"name": name, "data": {"dataset": dataset}}))
    (run / "metrics.json").write_text(json.dumps({
        "scenario": name, "utility": utility or [],
        "attacks": [{"failed": None, "round": attack_round, "metrics": {"psnr_mean": 1.0}}]}))
    return run


def test_best_shift_reads_the_crop_of_the_cells_dataset(tmp_path: Path) -> None:
    truth, mirrored = _dot(2, 1), _dot(2, 6)
    digits = _run(tmp_path, "d", truth, mirrored, dataset="digits")  # digits never flip
    cifar = _run(tmp_path, "c", truth, mirrored, dataset="cifar10")  # natural images flip
    assert abs(best_shift_psnr(digits) - ONE_PIXEL_MISS) < 0.01  # uint8 storage: exact for 0 / 255
    assert best_shift_psnr(cifar) == 100.0
    assert best_shift_psnr(tmp_path / "absent") is None


def test_the_attacked_model_is_the_one_sent_in_the_attacked_round() -> None:
    rows = [{"round": 0, "test_accuracy": 0.1}, {"round": 20, "test_accuracy": 0.8},
            {"round": 21, "test_accuracy": 0.9}]
    assert attacked_model_accuracy({"attacks": [{"round": 21}], "utility": rows}) == 0.8
    assert attacked_model_accuracy({"attacks": [{"round": 1}], "utility": rows}) == 0.1
    assert attacked_model_accuracy({"attacks": [{"round": 5}], "utility": rows}) is None  # round 4 not evaluated


def test_the_tables_show_best_shift_psnr_and_the_attacked_models_accuracy(tmp_path: Path) -> None:
    centre = {"model_state": "untrained", "federation.local.augmentation": "none"}
    truth = _dot(3, 3)
    rows = [{"round": 0, "test_accuracy": 0.1}, {"round": 20, "test_accuracy": 0.8},
            {"round": 21, "test_accuracy": 0.9}]
    cells = [("c0", {}, _dot(3, 3), 1, 30.0), ("c1", {"federation.local.augmentation": "flip_crop"}, _dot(3, 4), 1,
                                               ONE_PIXEL_MISS),
             ("c2", {"model_state": "trained"}, _dot(3, 5), 21, 12.0)]
    records = []
    for cid, params, recon, attack_round, psnr in cells:
        _run(tmp_path, cid, truth, recon, utility=rows, attack_round=attack_round)
        records.append({"cell_id": cid, "attack": "ig", "defense": "none", "params": {**centre, **params},
                        "repeat": 0, "seed": 0, "status": "ok", "error": None, "seconds": 1.0,
                        "run_dir": f"cells/{cid}", "summary": {"psnr_mean": psnr, "test_accuracy": 0.9}})
    (tmp_path / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    grid = {"name": "tiny", "sweep": {"model_state": {"bundles": {"untrained": {}, "trained": {}}},
                                      "federation.local.augmentation": ["none", "flip_crop"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    md = realistic_markdown(load_source(tmp_path))
    aug = md.split("### Leakage vs augmentation")[1]
    assert "best-shift PSNR none" in aug and "best-shift PSNR flip_crop" in aug
    ig = next(line for line in aug.splitlines() if line.startswith("| ig "))
    # raw 30.0 -> 15.1 dB falls; best-shift 100 (identical) -> 100 (one pixel off, forgiven): flat
    assert "| 100.0 dB | 100.0 dB | falls | flat |" in ig
    state = md.split("### Leakage vs model state")[1].split("###")[0]
    assert "test acc. untrained" in state
    ig = next(line for line in state.splitlines() if line.startswith("| ig "))
    assert "| 0.10 | 0.80 |" in ig  # rounds 0 and 20 (the models attacked), not the final 0.90
