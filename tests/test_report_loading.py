"""`fedsim report` on a malformed run directory: one line naming the file and the field, exit 2, nothing
written; and a successful redraw clears an earlier report failure's record (metrics.json, summary.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.outputs import RUN, mark
from fedsim.report.writer import _record_report_failure

GOOD = {"scenario": "t", "seed": 0, "backend": "inprocess", "training_diverged": None, "leakage": [],
        "utility": [{"round": 0, "seconds": 0.1, "test_accuracy": 0.5, "test_loss": 1.0},
                    {"round": 1, "seconds": 0.1, "test_accuracy": 0.6, "test_loss": 0.9}],
        "attacks": [{"attack": "a", "attack_index": 0, "round": 1, "client": 0, "failed": None,
                     "metrics": {"psnr_mean": 12.0}}],
        "timing": {"total_s": 1.0}}


def _run_dir(tmp_path: Path, metrics: object, raw: str | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(raw if raw is not None else json.dumps(metrics), encoding="utf-8")
    (run / "scenario.yaml").write_text("name: t\n", encoding="utf-8")
    return run


def _broken(path: str, value: object) -> dict:
    metrics = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = metrics
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return metrics


CASES = [("utility", "x", "utility"), ("utility.0", "x", "utility[0]"), ("utility.1.round", "r", "utility[1].round"),
         ("utility.1.test_accuracy", [1], "utility[1].test_accuracy"), ("attacks", {"a": 1}, "attacks"),
         ("attacks.0", [1], "attacks[0]"), ("attacks.0.attack_index", "zz", "attacks[0].attack_index"),
         ("attacks.0.metrics", "m", "attacks[0].metrics"), ("timing", [1], "timing"),
         ("timing.total_s", "slow", "timing.total_s"), ("seed", "s", "seed"), ("privacy", [1], "privacy")]


@pytest.mark.parametrize(("path", "value", "field"), CASES, ids=[c[2] for c in CASES])
def test_a_malformed_metrics_field_gives_one_line_naming_it(tmp_path: Path, path: str, value: object,
                                                            field: str) -> None:
    run = _run_dir(tmp_path, _broken(path, value))
    before = sorted(p.name for p in run.iterdir())
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "metrics.json" in lines[0] and f" {field} must be" in lines[0], lines[0]
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_invalid_json_and_a_good_file(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, None, raw='{"utility": [')
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    good = _run_dir(tmp_path / "g", GOOD) if (tmp_path / "g").mkdir() is None else None
    result = CliRunner().invoke(app, ["report", str(good)])
    assert result.exit_code == 0, result.output
    assert (good / "report.html").is_file()


@pytest.mark.parametrize("owned", [True, False], ids=["fedsim_run_dir", "not_fedsim_dir"])
def test_a_redraw_clears_the_report_failure_record(tmp_path: Path, owned: bool) -> None:
    run = _run_dir(tmp_path, GOOD)
    if owned:
        mark(run, RUN)
    failed = "report.html could not be drawn: TypeError: drawing bug"
    _record_report_failure(run, dict(GOOD), "# t\n\nresults\n", failed, run)  # what `fedsim run` leaves
    before = {name: (run / name).read_bytes() for name in ("metrics.json", "summary.md")}
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "Report not drawn" not in (run / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    summary = (run / "summary.md").read_text(encoding="utf-8")
    if not owned:  # never rewrite files in a directory fedsim did not write
        assert {name: (run / name).read_bytes() for name in before} == before
        return
    assert "report_error" not in metrics and "drawn again" in metrics["report_redrawn"]
    assert "**Error:" not in summary and "drawn again by `fedsim report`" in summary and "results" in summary
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # written through temp files, renamed
