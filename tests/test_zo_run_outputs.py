"""Outputs of a zeroth-order ``fedsim run`` (issue 13 QA pass 2): the attack time is measured, the image-attack
lists are not shown as 'no attacks', and a client failure mid-run keeps the finished rounds with the failure in
every output, worded as the black box's fault."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import fedsim.zo.run as zo_run
import fedsim.zo.tasks as zo_tasks
from fedsim.errors import SimulationError
from fedsim.scenario import parse_scenario

RAW = {"name": "zo-out", "seed": 0, "federation": {"protocol": "zeroth_order", "clients": 2, "rounds": 3},
       "backend": {"kind": "inprocess"},
       "zeroth_order": {"task": {"family": "quadratic", "dim": 3}, "method": "fzoos", "local_iters": 2,
                        "fzoos": {"rff_features": 50, "gp_points": 20, "rff_points": 20, "n_inits": 4,
                                  "explore_candidates": 10, "explore_top": 2, "refresh_candidates": 10,
                                  "refresh_top": 4}}}


def test_attack_time_is_measured_and_the_image_attack_lists_are_not_empty_lists(monkeypatch, tmp_path: Path) -> None:
    import fedsim.zo.attacks as zo_attacks

    real = zo_attacks.score_round
    pause = 0.2

    def slow(*args, **kwargs):  # the attacks take at least `pause` s per attacked round: a known lower bound
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(zo_attacks, "score_round", slow)
    zo_run.run_zo_scenario(parse_scenario(RAW), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    attacked = sum(1 for h in metrics["utility"] if "zo_attacked_clients" in h)
    assert attacked == 3
    assert metrics["timing"]["attacks_s"] >= attacked * pause
    assert metrics["timing"]["federation_s"] + metrics["timing"]["attacks_s"] == pytest.approx(
        metrics["timing"]["total_s"], abs=2e-3)
    assert metrics["attacks"] is None and metrics["leakage"] is None and "zo_extraction" in metrics["attacks_note"]
    assert f"attacks {metrics['timing']['attacks_s']:.1f} s" in (tmp_path / "run" / "summary.md").read_text()


def test_a_black_box_returning_nan_mid_run_keeps_the_finished_rounds_and_says_so_everywhere(
        monkeypatch, tmp_path: Path) -> None:
    scenario = parse_scenario(RAW)
    objective = zo_tasks.build_objective(scenario.zeroth_order, 2, 0)
    real, broken = objective.clients[1], {"on": False}

    def f1(xs: torch.Tensor) -> torch.Tensor:
        out = real(xs)
        return out * float("nan") if broken["on"] else out

    objective.clients[1] = f1
    monkeypatch.setattr(zo_tasks, "build_objective", lambda *a, **k: objective)
    monkeypatch.setattr(zo_run, "build_objective", lambda *a, **k: objective)

    def after_round(rnd: int, row: dict) -> None:
        broken["on"] = broken["on"] or rnd == 1  # f_1 breaks after round 1: round 2 fails

    with pytest.raises(SimulationError) as info:
        zo_run.run_zo_scenario(scenario, tmp_path / "run", on_round=after_round)
    msg = str(info.value)
    assert "\n" not in msg and "client 1" in msg and "round 2" in msg and "non-finite" in msg
    assert "Input y contains NaN" not in msg  # the GP library's words, not the black box's fault
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["round"] for h in metrics["utility"]] == [0, 1]
    assert metrics["client_failures"][0]["client"] == 1 and metrics["client_failures"][0]["round"] == 2
    assert "non-finite" in metrics["zeroth_order"]["run_error"]
    for name in ("summary.md", "report.html"):
        text = (run / name).read_text()
        assert "Error: the run stopped in round 2: client 1 failed" in text and "non-finite" in text, name
