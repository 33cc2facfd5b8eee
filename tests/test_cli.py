"""CLI exit codes: 0 on success, 2 with one line naming the problem (and nothing written) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedsim.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, raw: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_validate_ok_and_list() -> None:
    result = runner.invoke(app, ["validate", str(ROOT / "scenarios" / "quickstart.yaml")])
    assert result.exit_code == 0 and "ok" in result.output
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0
    for name in ("inverting_gradients", "gaussian_noise", "cifar10-mini", "convnet", "lenet"):
        assert name in listing.output


def test_bad_scenario_exits_2_with_the_field_path(tmp_path: Path, tiny_raw) -> None:
    tiny_raw["federation"]["local"]["lr"] = -1
    result = runner.invoke(app, ["validate", str(write(tmp_path, tiny_raw))])
    assert result.exit_code == 2
    assert "federation.local.lr" in result.output


def test_run_writes_the_run_directory(tmp_path: Path, tiny_raw) -> None:
    out = tmp_path / "run"
    tiny_raw["attacks"][0].update(rounds=[1, 2], clients=[0, 1])
    result = runner.invoke(app, ["run", str(write(tmp_path, tiny_raw)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("scenario.yaml", "metrics.json", "summary.md", "reconstructions.png", "utility.png",
                 "leakage_rounds.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in metrics["utility"]] == [0, 1, 2]
    assert len(metrics["attacks"]) == 4
    attack = metrics["attacks"][0]
    assert attack["attack"] == "inverting_gradients" and "psnr_mean" in attack["metrics"]
    assert "label_acc" in attack["metrics"]
    # the leakage curve: one row per (attack, round), averaged over the two attacked clients
    assert [(row["round"], row["clients"]) for row in metrics["leakage"]] == [(1, 2), (2, 2)]
    by_round = [o["metrics"]["psnr_mean"] for o in metrics["attacks"] if o["round"] == 1]
    assert abs(metrics["leakage"][0]["psnr_mean"] - sum(by_round) / 2) < 1e-9
    assert "Leakage" in (out / "summary.md").read_text()


def test_run_with_missing_data_exits_2_and_writes_nothing(tmp_path: Path, tiny_raw) -> None:
    tiny_raw["data"] = {"dataset": "mnist", "root": str(tmp_path / "nodata"), "download": False}
    tiny_raw["model"] = {"name": "lenet"}
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, tiny_raw)), "--out", str(out)])
    assert result.exit_code == 2
    assert "mnist" in result.output.lower() and str(tmp_path / "nodata") in result.output
    assert not out.exists() and not list(tmp_path.glob("run*"))


def test_console_script_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfederation: {rounds: zero}\n")
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "federation.rounds" in lines[0], proc.stderr
