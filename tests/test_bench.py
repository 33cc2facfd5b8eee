"""``fedsim bench``: grid expansion, validation with grid paths, the JSONL store, resume after SIGKILL, Ray."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fedsim.bench.expand import cell_id, expand_grid
from fedsim.bench.grid import load_grid, parse_grid
from fedsim.bench.runner import run_bench
from fedsim.bench.store import append_record, finished_ids, read_records, repair, summarize_run
from fedsim.cli import app
from fedsim.errors import FedsimError, ScenarioError
from fedsim.outputs import new_owned_dir
from fedsim.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"cell_id", "attack", "defense", "params", "repeat", "seed", "status", "error", "seconds", "run_dir",
               "summary"}


def grid_raw(tiny: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "t",
        "base": tiny,
        "attacks": ["inverting_gradients",
                    {"label": "ig-known", "name": "inverting_gradients", "knowledge": {"labels": "known"}}],
        "defenses": ["none", "gaussian_noise",
                     {"label": "dp", "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}]}],
        "sweep": {"federation.local.batch_size": [1, 2],
                  "defenses.0.params.noise_multiplier": {"values": [0.5, 2.0], "defenses": ["dp"]}},
        "repeats": 2,
    }


def test_expansion_counts_order_scoped_sweeps_seeds_and_stable_ids(tiny_raw) -> None:
    cells = expand_grid(parse_grid(grid_raw(tiny_raw)))
    # per repeat: 2 attacks x (none: 2 batch sizes + gaussian_noise: 2 + dp: 2 x 2 noise values)
    assert len(cells) == 2 * 2 * (2 + 2 + 4)
    assert [(c.repeat, c.attack) for c in cells[:9]] == [(0, "inverting_gradients")] * 8 + [(0, "ig-known")]
    assert [c.defense for c in cells[:8]] == ["none"] * 2 + ["gaussian_noise"] * 2 + [  # last sweep key fastest
        "dp(noise_multiplier=0.5)", "dp(noise_multiplier=2.0)", "dp(noise_multiplier=0.5)", "dp(noise_multiplier=2.0)"]
    dp = cells[4]
    assert dp.params == {"federation.local.batch_size": 1, "defenses.0.params.noise_multiplier": 0.5}
    assert dp.scenario["defenses"] == [{"name": "dp_sgd", "params": {"noise_multiplier": 0.5}}]
    assert dp.scenario["federation"]["local"]["batch_size"] == 1
    assert cells[1].scenario["federation"]["local"]["batch_size"] == 2 and cells[0].scenario["defenses"] == []
    # the noise sweep is scoped: no other defense entry gets it
    assert all("defenses.0.params.noise_multiplier" not in c.params for c in cells if not c.defense.startswith("dp"))
    # one attack per cell; the entry's spec is merged over the base's (targeting and budget kept)
    known = cells[8].scenario["attacks"]
    assert len(known) == 1 and known[0]["knowledge"]["labels"] == "known" and known[0]["budget"]["iterations"] == 5
    assert all(c.scenario["backend"]["kind"] == "inprocess" for c in cells)
    # seeds: one per repeat, derived from the base seed
    assert {c.seed for c in cells if c.repeat == 0} == {derive_seed(7, "bench-repeat", 0)}
    assert {c.seed for c in cells if c.repeat == 1} == {derive_seed(7, "bench-repeat", 1)}
    assert all(c.scenario["seed"] == c.seed for c in cells)
    # ids: unique, a function of (attack, defense, params, repeat) only, identical on re-expansion
    assert len({c.cell_id for c in cells}) == len(cells)
    assert all(c.cell_id == cell_id(c.attack, c.defense, c.params, c.repeat) for c in cells)
    assert [c.cell_id for c in expand_grid(parse_grid(grid_raw(copy.deepcopy(tiny_raw))))] == [c.cell_id
                                                                                                for c in cells]


def test_exclude_leaves_out_pairs(tiny_raw) -> None:
    raw = grid_raw(tiny_raw)
    raw["exclude"] = [{"attack": "ig-known", "defense": "dp"}, {"defense": "gaussian_noise"}]
    cells = expand_grid(parse_grid(raw))
    pairs = {(c.attack, c.defense.split("(")[0]) for c in cells}
    assert pairs == {("inverting_gradients", "none"), ("inverting_gradients", "dp"), ("ig-known", "none")}
    assert len(cells) == 2 * (2 + 4 + 2)


@pytest.mark.parametrize(("name", "count"),
                         [("fast", 20), pytest.param("full", 414, marks=pytest.mark.slow), ("malicious", 15)])
def test_shipped_grids_validate(name: str, count: int) -> None:
    grid = load_grid(ROOT / "benchmarks" / "grids" / f"{name}.yaml")
    cells = expand_grid(grid)
    assert grid.name == name and len(cells) == count
    assert {c.repeat for c in cells} == set(range(grid.repeats))
    assert all(c.scenario["backend"]["kind"] == "inprocess" and len(c.scenario["attacks"]) == 1 for c in cells)
    if name == "full":  # soteria is FedSGD-only: the FedAvg attacks are excluded, not refused
        assert not [c for c in cells if c.defense == "soteria" and c.attack in ("gradinversion", "fedavg_inversion")]
        # dp_sgd turns BatchNorm into GroupNorm: GradInversion's BN prior would have nothing (refused, so excluded)
        assert not [c for c in cells if c.defense == "dp_sgd" and c.attack == "gradinversion"]
        assert {c.scenario["attacks"][0]["budget"]["iterations"] for c in cells} == {1000}


def test_base_file_relative_to_the_grid_and_set_overrides(tmp_path: Path, tiny_raw) -> None:
    (tmp_path / "scen").mkdir()
    (tmp_path / "scen" / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    (tmp_path / "grids").mkdir()
    raw = grid_raw(tiny_raw)
    raw["base"] = "../scen/base.yaml"
    raw.pop("name")
    path = tmp_path / "grids" / "mygrid.yaml"
    path.write_text(yaml.safe_dump(raw))
    grid = load_grid(path, ["repeats=1", "base.federation.rounds=3"])
    assert grid.name == "mygrid" and grid.repeats == 1 and grid.base["federation"]["rounds"] == 3
    assert len(expand_grid(grid)) == 16


@pytest.mark.parametrize(("edit", "path"), [
    (lambda g: g["sweep"]["defenses.0.params.noise_multiplier"].update(values=[1.0, -1.0]),
     "sweep.defenses.0.params.noise_multiplier[1]"),
    (lambda g: g["defenses"].__setitem__(1, {"label": "gn", "defenses": [{"name": "gaussian_noise",
                                                                           "params": {"sigma": -1}}]}),
     "defenses[1].defenses[0].params.sigma"),
    (lambda g: g["attacks"].append({"name": "inverting_gradients", "label": "x", "params": {"nope": 1}}),
     "attacks[2].params.nope"),
    (lambda g: g["sweep"]["defenses.0.params.noise_multiplier"].update(defenses=["dp", "dpp"]),
     "sweep.defenses.0.params.noise_multiplier.defenses[1]"),
    (lambda g: g["sweep"].__setitem__("federation.rounds", [2, 0]), "sweep.federation.rounds[1]"),
    (lambda g: g["sweep"]["defenses.0.params.noise_multiplier"].pop("defenses"),  # unscoped: 'none' has no item 0
     "sweep.defenses.0.params.noise_multiplier[0]"),
    (lambda g: g["sweep"].__setitem__("seed", [1, 2]), "sweep.seed"),
    (lambda g: g.__setitem__("attacks", ["inverting_gradients", "inverting_gradients"]), "attacks[1].label"),
    (lambda g: g.__setitem__("repeat", 3), "repeat"),
    (lambda g: g.__setitem__("exclude", [{"attack": "nope"}]), "exclude[0].attack"),
])
def test_bad_grid_is_a_scenario_error_at_the_grid_path(tiny_raw, edit, path) -> None:
    raw = grid_raw(tiny_raw)
    edit(raw)
    with pytest.raises(ScenarioError) as err:
        expand_grid(parse_grid(raw))
    assert err.value.path == path, str(err.value)


def test_cli_bad_grid_exits_2_and_writes_nothing(tmp_path: Path, tiny_raw) -> None:
    raw = grid_raw(tiny_raw)
    raw["sweep"]["defenses.0.params.noise_multiplier"]["values"] = [1.0, -1.0]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(out), "--executor", "serial"])
    assert result.exit_code == 2
    assert "sweep.defenses.0.params.noise_multiplier[1]" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_out_naming_a_file_exits_2(tmp_path: Path, tiny_raw) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid_raw(tiny_raw)))
    taken = tmp_path / "a-file"
    taken.write_text("keep me")
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(taken), "--executor", "serial"])
    assert result.exit_code == 2 and "--out" in result.output and "Traceback" not in result.output
    assert taken.read_text() == "keep me"


def test_store_ignores_and_repairs_a_truncated_last_line(tmp_path: Path) -> None:
    store = tmp_path / "cells.jsonl"
    append_record(store, {"cell_id": "a", "status": "ok", "psnr": float("nan")})
    append_record(store, {"cell_id": "b", "status": "failed"})
    with open(store, "ab") as fh:
        fh.write(b'{"cell_id": "c", "stat')  # a crash in the middle of an append
    assert [r["cell_id"] for r in read_records(store)] == ["a", "b"] and finished_ids(store) == {"a", "b"}
    assert read_records(store)[0]["psnr"] is None  # strict JSON: NaN stored as null
    assert repair(store) and not repair(store)
    append_record(store, {"cell_id": "d", "status": "ok"})
    assert [r["cell_id"] for r in read_records(store)] == ["a", "b", "d"]
    assert store.read_text().count("\n") == 3


def test_summarize_run_from_metrics_json() -> None:
    metrics = {
        "utility": [{"round": 0, "test_accuracy": 0.1}, {"round": 1}, {"round": 2, "test_accuracy": 0.4}],
        "attacks": [{"failed": None, "metrics": {"psnr_mean": 10.0, "psnr_best": 12.0, "label_acc": 1.0}},
                    {"failed": None, "metrics": {"psnr_mean": 20.0, "psnr_best": 22.0, "label_acc": 0.5}},
                    {"failed": "no examples", "metrics": {"psnr_mean": 99.0}}],
        "client_metrics": {"1": {"0": {"epsilon": 1.0}}, "2": {"0": {"epsilon": 2.0}, "3": {"epsilon": 2.5}}},
    }
    s = summarize_run(metrics)
    assert s == {"psnr_mean": 15.0, "psnr_best": 17.0, "label_acc": 0.75, "attacks_failed": 1, "test_accuracy": 0.4,
                 "epsilon": 2.5, "epsilon_min": 2.0, "epsilon_median": 2.25, "epsilon_level": "sample",
                 "epsilon_dp_accounting_rdp": None, "epsilon_dp_accounting_pld": None,  # no sigma/q/steps logged
                 "rounds": 2, "clients_failed": 0}
    metrics["utility"][-1]["epsilon"] = 3.0  # central DP: the history's epsilon wins
    assert summarize_run(metrics)["epsilon"] == 3.0


def write_grid(tmp_path: Path, tiny_raw: dict[str, Any], iterations: int, defenses: list[Any]) -> Path:
    tiny_raw["attacks"][0]["budget"]["iterations"] = iterations
    tiny_raw["output"] = {"save_images": False}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "resume", "base": tiny_raw, "attacks": ["inverting_gradients"],
                                    "defenses": defenses, "resources": {"num_cpus": 1}}))
    return path


def test_failed_cell_is_recorded_and_the_bench_goes_on(tmp_path: Path, tiny_raw) -> None:
    tiny_raw["federation"]["rounds"] = 1
    path = write_grid(tmp_path, tiny_raw, 5, [
        {"label": "no-data", "defenses": [], "overrides": {"data.dataset": "mnist", "data.root": str(tmp_path)}},
        "none"])
    result = run_bench(load_grid(path), tmp_path / "b", executor="serial")
    records = read_records(tmp_path / "b" / "cells.jsonl")
    assert [r["status"] for r in records] == ["failed", "ok"] and result.failed == 1
    assert all(set(r) == RECORD_KEYS for r in records)
    assert "DataUnavailableError" in records[0]["error"] and records[0]["run_dir"] is None
    assert (tmp_path / "b" / records[1]["run_dir"] / "metrics.json").is_file()
    assert records[1]["summary"]["psnr_mean"] > 5 and records[1]["summary"]["rounds"] == 1
    # a directory of another grid is refused rather than silently mixed ...
    with pytest.raises(FedsimError, match="different grid"):
        run_bench(load_grid(path, ["base.federation.rounds=2"]), tmp_path / "b", executor="serial")
    # ... but a grid that grew runs only its new cells
    raw = yaml.safe_load(path.read_text())
    raw["defenses"].append("gaussian_noise")
    path.write_text(yaml.safe_dump(raw))
    grown = run_bench(load_grid(path), tmp_path / "b", executor="serial")
    assert grown.skipped == 2 and [r["defense"] for r in grown.records] == ["gaussian_noise"]
    assert len(read_records(tmp_path / "b" / "cells.jsonl")) == 3
    # --retry-failed reruns only the failed cell and keeps one record per cell
    retried = run_bench(load_grid(path), tmp_path / "b", executor="serial", retry_failed=True)
    assert retried.skipped == 2 and [r["defense"] for r in retried.records] == ["no-data"]
    assert sorted(r["defense"] for r in read_records(tmp_path / "b" / "cells.jsonl")) == [
        "gaussian_noise", "no-data", "none"]


def _bench_cmd(grid: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", "bench", str(grid), "--out", str(out), "--executor", "serial"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def test_resume_after_sigkill_runs_every_cell_exactly_once(tmp_path: Path, tiny_raw) -> None:
    defenses = ["none", "gaussian_noise", "pruning", "clipping"]
    grid = write_grid(tmp_path, tiny_raw, 40, defenses)
    out = tmp_path / "bench"
    store = out / "cells.jsonl"
    proc = subprocess.Popen(_bench_cmd(grid, out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (store.is_file() and read_records(store)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = store.read_text().splitlines()
    assert 1 <= len(first) < len(defenses), "the kill must land after the first cell and before the last"
    new_owned_dir(out / "cells" / "0123456789ab.partial", "run")  # fedsim's own, as if killed mid-write
    second = subprocess.run(_bench_cmd(grid, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(first)} skipped" in second.stdout + second.stderr
    lines = store.read_text().splitlines()
    assert lines[: len(first)] == first  # finished cells were not recomputed (same seconds, same bytes)
    records = [json.loads(line) for line in lines]
    ids = [c.cell_id for c in expand_grid(load_grid(grid))]
    assert sorted(r["cell_id"] for r in records) == sorted(ids)  # each cell exactly once, none lost
    assert all(r["status"] == "ok" and (out / r["run_dir"] / "metrics.json").is_file() for r in records)
    assert not list((out / "cells").glob("*.partial"))
    assert yaml.safe_load((out / "grid.yaml").read_text())["name"] == "resume"


@pytest.mark.ray
def test_ray_executor_matches_serial(tmp_path: Path, tiny_raw) -> None:
    grid = load_grid(write_grid(tmp_path, tiny_raw, 10, ["none", "pruning"]))
    ray_result = run_bench(grid, tmp_path / "ray", executor="ray", max_parallel=2)
    serial = run_bench(grid, tmp_path / "serial", executor="serial")
    by_id = {r["cell_id"]: r for r in serial.records}
    assert len(ray_result.records) == 2 and all(r["status"] == "ok" for r in ray_result.records), ray_result.records
    timing = {"federation_s"}  # wall time: the one summary entry that may differ between two runs
    for record in ray_result.records:
        ours = {k: v for k, v in record["summary"].items() if k not in timing}
        theirs = {k: v for k, v in by_id[record["cell_id"]]["summary"].items() if k not in timing}
        assert ours == theirs  # same numbers on a Ray worker
        assert "federation_s" in record["summary"]  # the wall time is recorded, just not compared
        assert (tmp_path / "ray" / record["run_dir"] / "metrics.json").is_file()
    assert len(read_records(tmp_path / "ray" / "cells.jsonl")) == 2
