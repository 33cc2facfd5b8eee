"""Attacks of a run as jobs (``attack_execution``): serial and Ray give the same outcomes, in the same order.

The outcome order, seeds and failure strings must not depend on the order jobs finish in; a job carries the
attack's view only (never ground truth); bad ``attack_execution`` / ``resources`` settings are refused at
validation with the field path.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import fedsim.attack_tasks as attack_tasks
from fedsim.attack_execution_spec import check_attack_execution
from fedsim.attack_tasks import AttackJob, AttackResult, SerialExecutor, portable, restored
from fedsim.attacking import run_attacks
from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for


def _raw(tiny_raw: dict[str, Any]) -> dict[str, Any]:
    """2 clients x 2 rounds, every client every round, two cheap attacks (IG 4 iterations, iDLG)."""
    raw = copy.deepcopy(tiny_raw)
    raw["federation"].update(clients=2, rounds=2)
    raw["attacks"] = [
        {"name": "inverting_gradients", "every": 1, "clients": "all", "budget": {"iterations": 4}},
        {"name": "idlg", "every": 1, "clients": "all", "budget": {"iterations": 3},
         "knowledge": {"labels": "infer"}},
    ]
    return raw


class ReversedPickling:
    """A fake executor: runs the jobs LAST first, each through a pickle round trip and the Ray task's own body
    (:func:`fedsim.attack_tasks.ray_task`, as Ray ships and runs it), and reports them in that order, so the
    runner's ordering, seeding, threads and shipping are checked without Ray."""

    def __init__(self) -> None:
        self.shipped: list[bytes] = []

    def run(self, jobs: Sequence[AttackJob], done: Callable[[AttackResult], None], progress: Any) -> None:
        for job in reversed(jobs):
            blob = pickle.dumps(portable(job))
            self.shipped.append(blob)
            done(restored(pickle.loads(pickle.dumps(attack_tasks.ray_task(pickle.loads(blob))))))


def _rows(outcomes: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        row = o.to_json()
        row.pop("seconds")  # wall time
        row["stats"] = {k: v for k, v in row["stats"].items() if "second" not in k and not k.endswith("_s")}
        rows.append(row)
    return rows


def _same_outcomes(a: list[Any], b: list[Any]) -> None:
    assert _rows(a) == _rows(b)  # every number exactly equal, same order
    for x, y in zip(a, b, strict=True):
        for name in ("reconstruction", "labels"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u, v), (name, x.attack, x.round, x.partition_id)


@pytest.fixture(scope="module")
def federation(request) -> tuple[Any, Any, Any]:
    from conftest import TINY

    scenario = parse_scenario(_raw(TINY))
    return scenario, run_federation(scenario), setup_for(scenario)


def _attack(federation, executor) -> list[Any]:
    scenario, outcome, setup = federation
    return run_attacks(scenario, outcome.capture.updates, setup.task, setup.device, (), None,
                       released=outcome.released, executor=executor)


def test_jobs_finishing_in_reverse_order_give_the_serial_outcomes_in_the_serial_order(federation) -> None:
    """8 jobs (2 attacks x 2 rounds x 2 clients) run last-first through pickle: the outcomes come back in the
    serial order (attack, round, client) with bit-identical metrics, stats, images and labels."""
    serial = _attack(federation, SerialExecutor())
    assert [(o.attack_index, o.round, o.partition_id) for o in serial] == [
        (i, r, c) for i in (0, 1) for r in (1, 2) for c in (0, 1)]
    assert not any(o.failed for o in serial)
    reversed_ = _attack(federation, ReversedPickling())
    _same_outcomes(serial, reversed_)


def test_a_job_carries_the_attack_view_and_no_ground_truth(federation) -> None:
    """What is shipped to a task names no ground truth and holds none of the clients' inputs."""
    executor = ReversedPickling()
    _attack(federation, executor)
    _, outcome, _ = federation
    for blob in executor.shipped:
        assert b"GroundTruth" not in blob and b"CapturedUpdate" not in blob
        job = restored(pickle.loads(blob))
        inputs = next(c.truth.inputs for c in outcome.capture.updates
                      if (c.round, c.partition_id) == (job.view.round, job.view.partition_id))
        assert inputs.numpy().tobytes() not in blob


def test_an_attack_that_raises_fails_alike_on_both_executors(federation, monkeypatch) -> None:
    """A raising attack is a failed outcome with ``Type: message`` in its place, whichever executor ran it."""
    original = attack_tasks._run_attack

    def flaky(attack: Any, view: Any, progress: Any) -> Any:
        if view.round == 2 and view.partition_id == 1 and type(attack).__name__ == "InvertingGradients":
            raise RuntimeError("boom in round 2")
        return original(attack, view, progress)

    monkeypatch.setattr(attack_tasks, "_run_attack", flaky)
    serial = _attack(federation, SerialExecutor())
    reversed_ = _attack(federation, ReversedPickling())
    _same_outcomes(serial, reversed_)
    failed = [(o.attack_index, o.round, o.partition_id, o.failed) for o in serial if o.failed]
    assert failed == [(0, 2, 1, "RuntimeError: boom in round 2")]


@pytest.mark.parametrize(("change", "path"), [
    ({"attack_execution": {"mode": "serial", "max_parallel": 2}}, "attack_execution.max_parallel"),
    ({"attack_execution": {"mode": "threads"}}, "attack_execution.mode"),
    ({"attack_execution": {"mode": "ray"}, "attacks.0.resources": {"num_gpus": 0.5}},
     "attacks[0].resources.num_gpus"),  # device: cpu
    ({"attack_execution": {"mode": "ray"}, "attacks.0.resources": {"num_cpus": 4096}},
     "attacks[0].resources.num_cpus"),
    ({"attack_execution": {"mode": "ray"}, "attacks.0.resources": {"num_cpus": 0}},
     "attacks[0].resources.num_cpus"),
])
def test_bad_attack_execution_is_refused_at_its_field(tiny_raw, change, path) -> None:
    raw = copy.deepcopy(tiny_raw)
    for key, value in change.items():
        if key.startswith("attacks.0."):
            raw["attacks"][0][key.split(".")[-1]] = value
        else:
            raw[key] = value
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)
    assert "\n" not in str(err.value)


def test_a_gpu_share_without_a_gpu_is_refused(tiny_raw, monkeypatch) -> None:
    import fedsim.resources as resources

    monkeypatch.setattr(resources, "available_gpus", lambda: 0)
    tiny_raw.update(device="auto", attack_execution={"mode": "ray"})
    tiny_raw["attacks"][0]["resources"] = {"num_gpus": 0.25}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(tiny_raw)
    assert err.value.path == "attacks[0].resources.num_gpus" and "no CUDA GPU" in err.value.reason


def test_validate_exits_2_with_one_line_naming_the_field(tiny_raw, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedsim.cli import app

    tiny_raw["attack_execution"] = {"mode": "serial", "max_parallel": 3}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    text = result.output.strip()
    assert "attack_execution.max_parallel" in text and "Traceback" not in text and len(text.splitlines()) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_give_metrics_identical_to_the_serial_path(tiny_raw, tmp_path) -> None:
    """The same scenario run with attack_execution serial and ray (real local Ray, 2 tasks at a time): metrics.json's
    attacks block equal number for number (wall times aside), and the images bit for bit."""
    import json

    from fedsim.run import run_scenario

    raw = _raw(tiny_raw)
    serial = run_scenario(parse_scenario(raw), tmp_path / "serial")
    raw["attack_execution"] = {"mode": "ray", "max_parallel": 2}
    for spec in raw["attacks"]:
        spec["resources"] = {"num_cpus": 1}
    ray = run_scenario(parse_scenario(raw), tmp_path / "ray")
    _same_outcomes(serial.outcomes, ray.outcomes)
    assert len(serial.outcomes) == 8 and not any(o.failed for o in serial.outcomes)

    def attacks(run_dir) -> list[dict[str, Any]]:
        data = json.loads((run_dir / "metrics.json").read_text())
        return _rows_json(data["attacks"])

    assert attacks(serial.out_dir) == attacks(ray.out_dir)


def _rows_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "seconds"}
        row["stats"] = {k: v for k, v in row.get("stats", {}).items() if "second" not in k and not k.endswith("_s")}
        out.append(row)
    return out


def test_an_attack_drawing_from_global_rngs_gets_the_same_draws_whatever_the_job_order(federation,
                                                                                         monkeypatch) -> None:
    """Draws an attack makes from torch's, NumPy's and Python's GLOBAL generators depend on its job's seed alone:
    identical when the jobs run last-first, and different from job to job. (Seeding only torch's generator, as
    the runner once did, gives each job the NumPy / Python draws of whichever job ran before it.)"""
    import random
    from dataclasses import replace

    import numpy as np

    original = attack_tasks._run_attack

    def drawing(attack: Any, view: Any, progress: Any) -> Any:
        rec = original(attack, view, progress)
        draws = {"draw_np": float(np.random.rand()), "draw_py": random.random(), "draw_torch": float(torch.rand(1))}
        return replace(rec, stats={**rec.stats, **draws})

    monkeypatch.setattr(attack_tasks, "_run_attack", drawing)
    np.random.seed(1)
    random.seed(1)
    serial = _attack(federation, SerialExecutor())
    np.random.seed(2)
    random.seed(2)
    reversed_ = _attack(federation, ReversedPickling())
    _same_outcomes(serial, reversed_)
    for key in ("draw_np", "draw_py", "draw_torch"):
        assert len({o.stats[key] for o in serial}) == len(serial)


def test_every_job_computes_with_its_own_thread_count_on_both_executors(federation, monkeypatch) -> None:
    """Issue 17 QA F4: the serial executor ignored ``job.threads`` while the Ray task applied it, so with
    ``resources.num_cpus`` set the two computed with different thread counts (different float summation order).
    Inside every job torch must run with the count the scenario asks for: ``num_cpus`` (3) for the first attack,
    the driver's count (2, set here) for the second; the driver's count is back afterwards."""
    from fedsim.isolation import torch_threads

    scenario, outcome, setup = federation
    attacks = [scenario.attacks[0].model_copy(update={"resources": scenario.attacks[0].resources.model_copy(
        update={"num_cpus": 3.0})}), scenario.attacks[1]]
    scenario = scenario.model_copy(update={"attacks": attacks})

    def counting(attack: Any, view: Any, progress: Any) -> Any:
        from fedsim.threat import Reconstruction

        return Reconstruction.failure(f"threads {torch.get_num_threads()}")  # cheap: no attack runs

    monkeypatch.setattr(attack_tasks, "_run_attack", counting)
    for executor in (SerialExecutor(), ReversedPickling()):
        with torch_threads(2):
            outcomes = run_attacks(scenario, outcome.capture.updates, setup.task, setup.device, (), None,
                                   released=outcome.released, executor=executor)
            assert torch.get_num_threads() == 2
        assert [(o.attack_index, o.failed) for o in outcomes] == [
            (i, f"threads {3 if i == 0 else 2}") for i in (0, 1) for _ in range(4)], type(executor).__name__


def test_a_job_whose_seeding_raises_is_the_same_failure_on_both_executors(federation, monkeypatch) -> None:
    """Issue 17 QA F3: seeding the job's device (``seeded_global_rngs``) sat outside the job's ``try``, so a device
    the process cannot reach ended the serial run and turned each Ray outcome into "Ray task failed". Now it is the
    same ``Type: message`` failed outcome, in its place, on both executors."""
    from contextlib import contextmanager

    @contextmanager
    def unreachable(seed: int, device: Any):
        raise RuntimeError("CUDA error: invalid device ordinal")
        yield

    monkeypatch.setattr(attack_tasks, "seeded_global_rngs", unreachable)
    serial = _attack(federation, SerialExecutor())
    reversed_ = _attack(federation, ReversedPickling())
    _same_outcomes(serial, reversed_)
    assert [o.failed for o in serial] == ["RuntimeError: CUDA error: invalid device ordinal"] * 8


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_ray_mode_on_cuda_needs_a_gpu_share(tiny_raw, tmp_path, monkeypatch, device) -> None:
    """Issue 17 QA F3: on a GPU machine (faked here) the jobs' device resolves to CUDA, but Ray sets
    ``CUDA_VISIBLE_DEVICES=""`` in a task reserving no GPU, so with the default ``num_gpus: 0`` every attack failed
    in ray mode while serial ran. ``fedsim validate`` now refuses it at the field (one line, exit 2); a share
    validates, and so do ``device: cpu`` and serial mode."""
    import os

    import yaml
    from typer.testing import CliRunner

    from fedsim.cli import app

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    tiny_raw.update(device=device, attack_execution={"mode": "ray"})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    result = CliRunner().invoke(app, ["validate", str(path)])
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert len(text.splitlines()) == 1 and "attacks[0].resources.num_gpus" in text and "Traceback" not in text
    with pytest.raises(ScenarioError) as err:
        parse_scenario(tiny_raw)
    assert err.value.path == "attacks[0].resources.num_gpus"
    for change in ({"attacks": [{**tiny_raw["attacks"][0], "resources": {"num_gpus": 0.25}}]}, {"device": "cpu"},
                   {"attack_execution": {"mode": "serial"}}):
        check_attack_execution(Scenario.model_validate({**tiny_raw, **change}))  # the rule alone: fast

