"""The report's realistic-training section (fedsim/report/realistic.py) from a small synthetic bench directory.

Kinds guarded here (expected values written by hand, never produced by the code under test):

* each axis's table holds, per attack, the cells that vary that axis with every other axis at its centre (the
  grid's first value), averaged over repeats, and a failed cell shows as failed, not as a number;
* the share above the trivial baseline counts the images whose PSNR beats their own flat mean colour's PSNR, from
  the stored true images and metrics.json's per-image PSNR (hand-made images with a known answer);
* the direction column (falls / rises / flat beyond 0.5 dB) and the section appear in report.html with its figure,
  and not at all for a bench without realistic axes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.report.html import render_report
from fedsim.report.loading import load_source
from fedsim.report.realistic import direction, point, realistic_markdown, trivial_share

CENTRE = {"federation.local.epochs": 1, "batch": "B8", "model_state": "untrained"}
GRID = {"name": "tiny-realistic", "sweep": {
    "federation.local.epochs": {"values": [1, 5]},
    "batch": {"bundles": {"B8": {"federation.local.batch_size": 8}, "B64": {"federation.local.batch_size": 64}}},
    "model_state": {"bundles": {"untrained": {"attacks.0.rounds": [1]}, "trained": {"attacks.0.rounds": [5]}}},
}, "design": "one_at_a_time"}


def _truth_and_psnr() -> tuple[np.ndarray, list[float], list[float]]:
    """4 images 2x2 whose own-mean-colour PSNR is known by hand, and per-image PSNRs two above, two below it."""
    truth = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    truth[:, 0, 0, 0] = 255  # one white pixel of four: mean 0.25, MSE = (0.75^2 + 3 * 0.25^2) / 4 = 0.1875
    base = -10 * math.log10(0.1875)  # 7.27 dB for every image
    return truth, [base + 5, base - 1, base + 0.5, base - 3], [base] * 4


def _cell(root: Path, cid: str, attack: str, params: dict[str, Any], psnr: float, *, status: str = "ok",
          repeat: int = 0, per_image: bool = False) -> dict[str, Any]:
    run = root / "cells" / cid
    run.mkdir(parents=True)
    metrics: dict[str, Any] = {"psnr_mean": psnr, "lpips_mean": 0.5, "label_acc": 1.0}
    if per_image:
        truth, per, _ = _truth_and_psnr()
        np.savez(run / "reconstructions.npz", truth_0=truth, recon_0=truth)
        metrics["psnr_per_image"] = per
    (run / "metrics.json").write_text(json.dumps({"attacks": [{"failed": None, "metrics": metrics}]}))
    summary = {"psnr_mean": psnr, "lpips_mean": 0.5, "label_acc": 1.0, "test_accuracy": 0.5} if status == "ok" else {}
    return {"cell_id": cid, "attack": attack, "defense": "none", "params": {**CENTRE, **params}, "repeat": repeat,
            "seed": 0, "status": status, "error": None if status == "ok" else "RuntimeError: boom",
            "seconds": 1.0, "run_dir": f"cells/{cid}" if status == "ok" else None, "summary": summary}


def _bench(root: Path) -> Path:
    records = [
        _cell(root, "a0", "ig", {}, 20.0, per_image=True), _cell(root, "a0r", "ig", {}, 22.0, repeat=1),
        _cell(root, "a1", "ig", {"federation.local.epochs": 5}, 12.0),
        _cell(root, "a2", "ig", {"batch": "B64"}, 21.2),
        _cell(root, "a3", "ig", {"model_state": "trained"}, 25.0),
        # a cell off the centre on two axes: in no table
        _cell(root, "a4", "ig", {"federation.local.epochs": 5, "batch": "B64"}, 99.0),
        _cell(root, "b0", "dia", {}, 15.0), _cell(root, "b1", "dia", {"batch": "B64"}, 0.0, status="failed"),
    ]
    (root / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))  # as the bench writes it
    return root


def test_the_trivial_share_counts_images_above_their_own_mean_colour(tmp_path: Path) -> None:
    truth, per, base = _truth_and_psnr()
    np.savez(tmp_path / "reconstructions.npz", truth_0=truth)
    share, trivial = trivial_share(tmp_path, {"psnr_per_image": per})
    assert share == 0.5 and abs(trivial - base[0]) < 1e-9
    assert trivial_share(tmp_path / "absent", {"psnr_per_image": per}) == (None, None)


def test_tables_hold_the_centre_and_one_axis_averaged_over_repeats(tmp_path: Path) -> None:
    source = load_source(_bench(tmp_path))
    md = realistic_markdown(source)
    epochs = md.split("### Leakage vs local epochs")[1].split("###")[0]
    ig = next(line for line in epochs.splitlines() if line.startswith("| ig "))
    assert "21.0 dB" in ig and "12.0 dB" in ig and "| falls |" in ig  # (20 + 22) / 2 at the centre; 99 left out
    assert "0.50" in ig  # the share above trivial of the centre's one stored repeat
    batch = md.split("### Leakage vs local batch size")[1].split("###")[0]
    assert "| flat |" in next(line for line in batch.splitlines() if line.startswith("| ig "))  # +0.2 dB
    assert "failed (1/1)" in next(line for line in batch.splitlines() if line.startswith("| dia "))
    state = md.split("### Leakage vs model state")[1]
    assert "| rises |" in next(line for line in state.splitlines() if line.startswith("| ig "))
    assert "99.0" not in md


def test_direction_needs_two_measured_points() -> None:
    one = point([])
    assert direction({"1": one}, [1, 5]) == "n/a"


def test_the_section_renders_in_report_html_only_for_a_realistic_grid(tmp_path: Path) -> None:
    html = render_report(_bench(tmp_path / "bench")).read_text(encoding="utf-8")
    assert "Does the attack survive real training?" in html and "Leakage vs local epochs" in html
    assert 'alt="leakage against local epochs' in html and "failed (1/1)" in html
    plain = tmp_path / "plain"
    plain.mkdir()
    record = _cell(plain, "p0", "ig", {}, 20.0)
    record["params"] = {}
    (plain / "cells.jsonl").write_text(json.dumps(record) + "\n")
    assert "Does the attack survive real training?" not in render_report(plain).read_text(encoding="utf-8")


def test_values_are_read_in_numeric_order_with_the_centre_first_in_the_grid() -> None:
    from fedsim.report.realistic import display_order

    assert display_order(["B8", "B1", "B32", "B64"]) == ["B1", "B8", "B32", "B64"]
    assert display_order([1, 5, 2]) == [1, 2, 5]
    assert display_order(["untrained", "trained"]) == ["untrained", "trained"]  # no numbers: the grid's order
