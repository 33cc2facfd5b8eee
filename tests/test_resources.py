"""Resource requests this machine cannot meet are refused at validation (issue 11, item 7).

The kind: a request (CPUs or GPUs per Ray client or bench cell, ``device: cuda``) that can never be
met used to validate, then fail minutes later with a long traceback (or make Ray wait forever). Each
is now one line naming the field, exit code 2, nothing written. The machine is faked: ``os.cpu_count``
and torch's CUDA queries are monkeypatched, so these tests mean the same on a laptop and a GPU box.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario


@pytest.fixture
def two_cpus_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _ray(num_cpus: float = 1.0, num_gpus: float = 0.0, **backend) -> dict:
    raw = copy.deepcopy(TINY)
    raw["backend"] = {"kind": "ray", "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, **backend}
    return raw


@pytest.mark.parametrize(("raw", "path"), [
    (_ray(num_cpus=4), "backend.client_resources.num_cpus"),
    (_ray(num_gpus=0.25), "backend.client_resources.num_gpus"),
    (_ray(num_gpus=1), "backend.client_resources.num_gpus"),
    (_ray(num_cpus=3, init_args={"num_cpus": 2}), "backend.client_resources.num_cpus"),
    ({**copy.deepcopy(TINY), "device": "cuda"}, "device"),
], ids=["cpus", "fractional-gpu", "gpu", "init-args-cpus", "device-cuda"])
def test_unmeetable_requests_are_refused_with_their_field(two_cpus_no_gpu, raw: dict, path: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)


def test_meetable_requests_validate(two_cpus_no_gpu) -> None:
    assert parse_scenario(_ray(num_cpus=2))
    assert parse_scenario(_ray(num_cpus=4, init_args={"num_cpus": 8}))  # Ray's logical CPUs, as asked
    assert parse_scenario(_ray(num_gpus=1, address="auto"))  # a cluster's resources are its own
    raw = _ray(num_cpus=64)
    raw["backend"]["kind"] = "inprocess"  # no Ray, nothing to schedule
    assert parse_scenario(raw)


def test_requests_a_gpu_machine_can_meet_validate(one_gpu) -> None:
    assert parse_scenario(_ray(num_gpus=0.5))
    assert parse_scenario({**copy.deepcopy(TINY), "device": "cuda"})
    with pytest.raises(ScenarioError, match="at most 1"):
        parse_scenario(_ray(num_gpus=2))


def test_cli_validate_and_run_exit_2_with_one_line(two_cpus_no_gpu, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_ray(num_gpus=0.5)))
    runner = CliRunner()
    for args in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "run")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "backend.client_resources.num_gpus" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_bench_resources_are_checked_before_anything_is_written(two_cpus_no_gpu, tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": copy.deepcopy(TINY), "attacks": ["inverting_gradients"],
                                    "resources": {"num_cpus": 1, "num_gpus": 0.5}}))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert "resources.num_gpus" in result.output and "Traceback" not in result.output
    assert not out.exists()
    grid.write_text(yaml.safe_dump({"name": "g", "base": copy.deepcopy(TINY), "attacks": ["inverting_gradients"],
                                    "resources": {"num_cpus": 3}}))
    result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--executor", "ray"])
    assert result.exit_code == 2 and "resources.num_cpus" in result.output and not out.exists()


def test_an_argument_ray_init_does_not_take_is_refused_with_its_field() -> None:
    """``backend.init_args.bogus_arg`` used to pass validation, then Ray raised inside Flower's backend and
    the run hung. The expected list comes from ``ray.init``'s own signature, read here independently."""
    import inspect

    import ray

    assert "bogus_arg" not in inspect.signature(ray.init).parameters
    raw = copy.deepcopy(TINY)
    raw["backend"] = {"kind": "ray", "init_args": {"bogus_arg": 1}}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "backend.init_args.bogus_arg"
    raw["backend"]["init_args"] = {"include_dashboard": False, "_temp_dir": "/tmp/ray"}  # real and private keys
    parse_scenario(raw)


@pytest.mark.parametrize(("kind", "cuda", "expected"), [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda"),
])
def test_device_auto_picks_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch, kind: str, cuda: bool,
                                                  expected: str) -> None:
    """Issue 17 item 8: ``device: auto`` is the GPU path when a GPU exists; ``cpu`` stays on the CPU."""
    from fedsim.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(kind).type == expected


def test_cuda_clients_on_ray_need_a_gpu_share(one_gpu) -> None:
    """Issue 17 QA F3, the same kind for the federation: Ray hides the GPUs (``CUDA_VISIBLE_DEVICES=""``) from a
    client actor that reserves none, so ``device: cuda`` with ``client_resources.num_gpus: 0`` validated, then every
    client failed resolving its device. Refused at the field; a share validates."""
    raw = {**_ray(num_gpus=0), "device": "cuda"}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "backend.client_resources.num_gpus" and "\n" not in str(err.value)
    from fedsim.resources import check_scenario_resources
    from fedsim.scenario import Scenario

    check_scenario_resources(Scenario.model_validate({**_ray(num_gpus=0.5), "device": "cuda"}))


def test_cuda_cells_on_ray_need_a_gpu_share(one_gpu, tmp_path: Path) -> None:
    """The same kind for bench cells run as Ray tasks: ``device: cuda`` with the default ``resources.num_gpus: 0``
    failed every cell (no GPU visible in the task). Refused before anything is written; serial is unaffected."""
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": {**copy.deepcopy(TINY), "device": "cuda"},
                                    "attacks": ["inverting_gradients"], "resources": {"num_cpus": 1}}))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert "resources.num_gpus" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def _grid(tmp_path: Path, base: dict | None = None, **fields) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "base": base or copy.deepcopy(TINY),
                                    "attacks": ["inverting_gradients"], **fields}))
    return path


def _one_line_exit_2(result, field: str) -> None:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert field in text and len(text.splitlines()) == 1 and "Traceback" not in text, text


@pytest.mark.parametrize(("resources", "field"), [({"num_cpus": 64}, "resources.num_cpus"),
                                                   ({"num_gpus": 0.5}, "resources.num_gpus")])
def test_bench_dry_run_runs_the_checks_of_the_real_run(two_cpus_no_gpu, tmp_path: Path, resources: dict,
                                                       field: str) -> None:
    """QA F1: ``--dry-run`` said ok to per-cell resources the real run (``--executor ray``, the default) refuses."""
    grid, out = _grid(tmp_path, resources=resources), tmp_path / "bench"
    _one_line_exit_2(CliRunner().invoke(app, ["bench", str(grid), "--dry-run", "--out", str(out)]), field)
    _one_line_exit_2(CliRunner().invoke(app, ["bench", str(grid), "--dry-run", "--executor", "threads"]), "--executor")
    assert not out.exists()


@pytest.mark.parametrize(("resources", "field", "words"), [
    ({"num_gpus": 0.5}, "attacks[0].resources.num_gpus", "no CUDA GPU"),
    ({"num_cpus": 64}, "attacks[0].resources.num_cpus", "has 2 CPUs"),
])
def test_serial_attack_resources_are_checked_like_max_parallel(two_cpus_no_gpu, tmp_path: Path, resources: dict,
                                                               field: str, words: str) -> None:
    """QA F3: with ``attack_execution.mode: serial`` (the default) a GPU share or more CPUs than the machine has were
    accepted and ignored, while ``max_parallel`` was refused. ``num_cpus`` is the serial job's torch threads."""
    raw = copy.deepcopy(TINY)
    raw["attacks"][0]["resources"] = resources
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(path)])
    _one_line_exit_2(result, field)
    assert words in result.output
    raw["attacks"][0]["resources"] = {"num_cpus": 2, "num_gpus": 0}  # what the machine has: fine
    assert parse_scenario(raw)


def test_serial_attacks_refuse_a_gpu_share_even_on_a_gpu_machine(one_gpu) -> None:
    """num_gpus is read only by the Ray executor (a task's reservation): in serial mode it would be ignored."""
    raw = copy.deepcopy(TINY)
    raw["attacks"][0]["resources"] = {"num_gpus": 0.25}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "attacks[0].resources.num_gpus" and "mode: ray" in err.value.reason


def test_bench_refuses_a_base_asking_for_ray_attack_tasks(two_cpus_no_gpu, tmp_path: Path) -> None:
    """QA F2: bench replaced the base's ``attack_execution: {mode: ray}`` by serial without a word and so ignored
    the attacks' ``resources.num_gpus`` that ``fedsim validate`` refuses. Now the dry run and the run refuse the
    base at its field; made serial, the GPU share is refused as validate refuses it."""
    base = copy.deepcopy(TINY)
    base["attack_execution"] = {"mode": "ray"}
    base["attacks"][0]["resources"] = {"num_gpus": 0.5}
    grid, out = _grid(tmp_path, base=base), tmp_path / "bench"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["bench", str(grid), "--executor", "serial", "--out", str(out), *extra])
        _one_line_exit_2(result, "base.attack_execution.mode")
        assert "serially" in result.output
    assert not out.exists()
    base["attack_execution"] = "ray"  # the shorthand of {mode: ray}
    _one_line_exit_2(CliRunner().invoke(app, ["bench", str(_grid(tmp_path, base=base)), "--dry-run"]),
                     "base.attack_execution.mode")
    base["attack_execution"] = {"mode": "ray"}
    grid = _grid(tmp_path, base=base)
    serial = ["bench", str(grid), "--executor", "serial", "--dry-run", "--set", "base.attack_execution.mode=serial"]
    _one_line_exit_2(CliRunner().invoke(app, serial), "resources.num_gpus")
    result = CliRunner().invoke(app, [*serial, "--set", "base.attacks.0.resources.num_gpus=0"])
    assert result.exit_code == 0 and "1 cells validated" in result.output, result.output


def test_serial_bench_executor_refuses_or_notes_what_it_does_not_read(two_cpus_no_gpu, tmp_path: Path) -> None:
    """The same kind for ``--executor serial``: ``--max-parallel`` was ignored, ``resources.num_cpus`` (each cell's
    torch threads) was not checked against the machine, and the grid's Ray-only fields were dropped without a word."""
    runner, out = CliRunner(), tmp_path / "bench"
    serial = ["--executor", "serial", "--out", str(out)]
    for extra in (["--dry-run"], []):
        _one_line_exit_2(runner.invoke(app, ["bench", str(_grid(tmp_path)), *serial, "--max-parallel", "2", *extra]),
                         "--max-parallel")
        _one_line_exit_2(runner.invoke(app, ["bench", str(_grid(tmp_path, resources={"num_cpus": 64})), *serial,
                                             *extra]), "resources.num_cpus")
    assert not out.exists()
    grid = _grid(tmp_path, resources={"num_gpus": 0.5}, max_parallel=3)
    result = runner.invoke(app, ["bench", str(grid), *serial, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "resources.num_gpus 0.5 and max_parallel 3" in result.output and "not used" in result.output
