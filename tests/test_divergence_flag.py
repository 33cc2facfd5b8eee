"""A run whose loss became non-finite or exploded says so in metrics.json, summary.md, report.html, the CLI and its
bench cell, next to the accuracy change (scenarios/defenses/diff2.yaml once shipped such a run: train loss 2.3 ->
3e16, test loss 8.6e16, and its summary read only "Test accuracy 0.081 -> 0.203"); the shipped DIFF2 scenario itself
converges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedsim.bench.store import summarize_run
from fedsim.report.divergence import divergence_note
from fedsim.report.writer import write_run_dir
from fedsim.scenario import parse_scenario

# the measured history of the diverged diff2.yaml run (c2 = 5, seed 0), rounded
DIVERGED = [
    {"round": 0, "test_loss": 2.3128, "test_accuracy": 0.0806},
    {"round": 1, "train_loss": 2.3167}, {"round": 2, "train_loss": 2.3136}, {"round": 3, "train_loss": 4.9964},
    {"round": 4, "train_loss": 699438.2},
    {"round": 5, "train_loss": 8.18e10, "test_loss": 6.34e15, "test_accuracy": 0.0417},
    {"round": 20, "train_loss": 3.03e16, "test_loss": 8.57e16, "test_accuracy": 0.2028},
]
HEALTHY = [
    {"round": 0, "test_loss": 2.313, "test_accuracy": 0.08}, {"round": 1, "train_loss": 2.317},
    {"round": 2, "train_loss": 2.9}, {"round": 20, "train_loss": 2.126, "test_loss": 2.252, "test_accuracy": 0.19},
]


@pytest.mark.parametrize(("history", "diverged"), [
    (DIVERGED, True),
    (HEALTHY, False),
    ([{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": math.nan}], True),
    ([{"round": 0, "test_loss": 2.0}, {"round": 5, "test_loss": math.inf}], True),
    ([{"round": 0, "test_loss": 2.0}, {"round": 5, "test_loss": None}], True),  # NaN written to JSON as null
    ([{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 10.5}, {"round": 3, "train_loss": 0.5}], True),
    ([{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 9.5}], False),  # below 10x
    ([{"round": 0, "test_loss": 5000.0}, {"round": 5, "test_loss": 30.0}], False),  # a regression MSE falling
    ([{"round": 1, "seconds": 0.1}], False),  # nothing recorded
])
def test_divergence_note(history: list[dict], diverged: bool) -> None:
    note = divergence_note(history)
    assert (note is not None) == diverged
    if diverged:
        assert note.startswith("training diverged") and "\n" not in note


@pytest.mark.parametrize("history", [DIVERGED, HEALTHY], ids=["diverged", "healthy"])
def test_summary_and_report_flag_a_diverged_run(tiny_raw, tmp_path: Path, history: list[dict]) -> None:
    out = write_run_dir(tmp_path / "run", parse_scenario(tiny_raw), history, [], {})
    summary = (out / "summary.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    flagged = history is DIVERGED
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["training_diverged"] is not None) == flagged  # the raw record, and a bench cell built from it
    assert (summarize_run(metrics).get("training_diverged") is not None) == flagged
    assert ("training diverged" in summary) == flagged
    assert ("training diverged" in html) == flagged
    if flagged:
        line = next(x for x in summary.splitlines() if "training diverged" in x)
        assert "3.03e+16" in line and "Warning" in line
        assert "Test accuracy 0.081 (round 0) -> 0.203 (round 20)." in summary  # still shown, now with the flag


@pytest.mark.slow
def test_the_shipped_diff2_scenario_converges() -> None:
    from fedsim.simulation import run_federation

    raw = yaml.safe_load((Path(__file__).parents[1] / "scenarios/defenses/diff2.yaml").read_text(encoding="utf-8"))
    raw["attacks"] = []
    history = run_federation(parse_scenario(raw)).history
    tested = [h for h in history if "test_loss" in h]
    assert divergence_note(history) is None
    assert tested[-1]["test_loss"] < tested[0]["test_loss"]


@pytest.mark.parametrize("history", [DIVERGED, HEALTHY], ids=["diverged", "healthy"])
def test_cli_warns_about_a_diverged_run(capsys, history: list[dict]) -> None:
    from types import SimpleNamespace

    from fedsim.cli import _print_result

    _print_result(SimpleNamespace(history=history, client_failures=[], outcomes=[], out_dir=None,
                                  timing={"federation_s": 1.0, "attacks_s": 0.0}))
    printed = capsys.readouterr().out
    assert ("warning: training diverged" in printed) == (history is DIVERGED)
