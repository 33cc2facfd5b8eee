"""What every output says: strict JSON everywhere, an infinite epsilon shown as inf (never as "no DP"), epsilon
against the curious server beside the released one wherever leakage sits beside epsilon, absent data refused by
validate as by run, and an attack that did not run named with its reason."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fedsim import jsonio
from fedsim.cli import app
from fedsim.report.loading import Cell, load_source
from fedsim.report.sections import leaderboard_section
from fedsim.report.tables import leaderboard, write_leaderboard_csv
from fedsim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _dp_sat(**edits: Any) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "scenarios" / "defenses" / "dp_sat.yaml").read_text(encoding="utf-8"))
    raw["attacks"][0]["budget"] = {"iterations": 2, "restarts": 1}
    raw["federation"]["rounds"] = 2
    raw["device"] = "cpu"
    for key, value in edits.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return raw


def _strict(path: Path) -> list[Any]:
    """Every JSON document in ``path`` (a .json file, or each line of a .jsonl), parsed as jq would."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [jsonio.strict_loads(line) for line in text.splitlines() if line.strip()]
    return [jsonio.strict_loads(text)]


# --- C + B: strict JSON, inf round-trips as inf -------------------------------------------------------------


def test_strict_parser_refuses_what_python_json_writes_by_default() -> None:
    with pytest.raises(ValueError):
        jsonio.strict_loads(json.dumps({"e": math.inf}))
    with pytest.raises(ValueError):
        jsonio.strict_loads(json.dumps({"c": math.nan}))
    text = jsonio.dumps({"e": math.inf, "m": -math.inf, "c": math.nan, "l": [1.5, math.inf]})
    assert jsonio.strict_loads(text) == {"e": "inf", "m": "-inf", "c": None, "l": [1.5, "inf"]}
    assert jsonio.loads(text) == {"e": math.inf, "m": -math.inf, "c": None, "l": [1.5, math.inf]}


def test_every_json_a_run_and_a_bench_write_is_strict_and_infinite_epsilon_stays_inf(tmp_path: Path) -> None:
    """sigma = 0: Opacus's epsilon is inf and DP-SAT's cos_prev_grad NaN on the first step; both must reach
    strict JSON, and the report / leaderboard must show inf, not an absent epsilon."""
    from fedsim.bench.grid import parse_grid
    from fedsim.bench.runner import run_bench
    from fedsim.run import run_scenario

    raw = _dp_sat(**{"defenses.0.params.noise_multiplier": 0.0})
    run_dir = run_scenario(parse_scenario(raw), tmp_path / "run").out_dir
    grid = parse_grid({"name": "g", "base": raw, "attacks": ["inverting_gradients"],
                       "defenses": [{"label": "dp_sat0", "defenses": raw["defenses"]}], "repeats": 1})
    run_bench(grid, tmp_path / "bench", executor="serial")
    from fedsim.report.html import render_report

    bench_html = render_report(tmp_path / "bench")
    files = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert any(p.name == "metrics.json" for p in files) and any(p.name == "cells.jsonl" for p in files)
    for path in files:
        _strict(path)  # raises on NaN / Infinity
    metrics = jsonio.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["privacy"]["dp_sgd"]["epsilon_max"] == math.inf
    record = jsonio.loads((tmp_path / "bench" / "cells.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert record["summary"]["epsilon"] == math.inf  # was null: read as "no DP"
    for source_dir, html in ((run_dir, run_dir / "report.html"), (tmp_path / "bench", bench_html)):
        cells = load_source(source_dir).cells
        assert all(c.summary["epsilon"] == math.inf for c in cells)
        rows = leaderboard(cells)
        assert rows[0].stats["epsilon"].mean == math.inf
        section = leaderboard_section(rows, "x.csv")
        assert "\u03b5</th>" in section and ">inf<" in section.replace(" ", "")
        assert ">inf<" in html.read_text(encoding="utf-8").replace(" ", "")
    with (run_dir / "report" / "leaderboard.csv").open(encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert row["epsilon_mean"] == "inf"
    assert "inf" in (run_dir / "summary.md").read_text(encoding="utf-8")


# --- A: epsilon against the curious server beside leakage -------------------------------------------------


def _cell(summary: dict[str, Any], cell_id: str = "c0") -> Cell:
    return Cell(cell_id, "inverting_gradients", "diff2(central)", {}, 0, 0, "ok", None, 1.0, None, summary)


def test_leaderboard_puts_epsilon_vs_server_beside_the_released_epsilon(tmp_path: Path) -> None:
    central = _cell({"psnr_mean": 40.0, "epsilon": 8.0, "epsilon_vs_server": math.inf, "epsilon_level": "sample"})
    local = _cell({"psnr_mean": 6.0, "epsilon": 8.0, "epsilon_vs_server": 95.0, "epsilon_level": "sample"}, "c1")
    local.defense = "diff2(local)"
    rows = leaderboard([central, local])
    section = leaderboard_section(rows, "x.csv")
    assert "\u03b5 vs server" in section
    assert rows[0].stats["epsilon_vs_server"].mean == math.inf and rows[1].stats["epsilon_vs_server"].mean == 95.0
    write_leaderboard_csv(rows, tmp_path / "l.csv")
    with (tmp_path / "l.csv").open(encoding="utf-8") as fh:
        got = [(r["defense"], r["epsilon_mean"], r["epsilon_vs_server_mean"]) for r in csv.DictReader(fh)]
    assert got == [("diff2(central)", "8.0", "inf"), ("diff2(local)", "8.0", "95.0")]


def test_diff2_placements_rows_carry_epsilon_vs_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("diff2_placements", ROOT / "benchmarks" / "diff2_placements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    privacy = {"diff2": {"epsilon": 8.0, "epsilon_vs_server": math.inf}}
    fake = SimpleNamespace(history=[{"round": 1, "diff2_epsilon": 8.0, "test_accuracy": 0.5}], outcomes=[],
                           client_metrics={}, privacy=privacy)
    monkeypatch.setattr(module, "run_scenario", lambda *a, **k: fake)
    fake.outcomes = [SimpleNamespace(round=1, partition_id=0, metrics={"psnr_mean": 30.0}, failed=None,
                                     truth=None, seconds=0.1)]
    rows = module.run_row(None, 3)
    assert rows[0]["epsilon"] == 8.0 and rows[0]["epsilon_vs_server"] == math.inf


# --- D: what validate accepts must run, for absent data ---------------------------------------------------------


def _scenario_file(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("data", [
    {"dataset": "california-housing", "root": "{tmp}/nothing"},
    {"dataset": "imagefolder", "root": "{tmp}/empty"},
    {"dataset": "imagefolder", "root": "{tmp}/missing"},
])
def test_validate_refuses_absent_data_as_run_does(tmp_path: Path, tiny_raw, data: dict[str, str]) -> None:
    (tmp_path / "empty").mkdir()
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {**raw["data"], **{k: v.format(tmp=tmp_path) for k, v in data.items()}, "download": False}
    if data["dataset"] == "california-housing":
        raw["model"] = {"name": "fc10"}
        raw["attacks"] = []
    path = _scenario_file(tmp_path, raw)
    checked = runner.invoke(app, ["validate", str(path)])
    ran = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert ran.exit_code == 2, ran.output
    assert checked.exit_code == 2, checked.output
    assert checked.output.strip() == ran.output.strip()  # the same one line
    assert checked.output.startswith("error: dataset") and len(checked.output.strip().splitlines()) == 1


def test_california_download_failure_is_one_line_without_sklearn_retry_warnings(monkeypatch, tmp_path) -> None:
    import sklearn.datasets

    from fedsim.data.tabular import load_california_housing
    from fedsim.errors import DataUnavailableError

    def fetch(**kwargs: Any) -> None:
        for _ in range(2):
            warnings.warn("Retry downloading from url: https://example.invalid/cal_housing.tgz", stacklevel=1)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", fetch)
    spec = parse_scenario({**_dp_sat(), "data": {"dataset": "california-housing", "root": str(tmp_path),
                                                 "download": True}, "model": {"name": "fc10"}, "defenses": [],
                           "attacks": []}).data
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(DataUnavailableError):
            load_california_housing(spec)
    assert not [w for w in seen if "Retry downloading" in str(w.message)]


# --- E: an attack that did not run says which and why ------------------------------------------------------------


def test_not_attacked_names_each_named_client_without_an_update() -> None:
    from fedsim.attacking import not_attacked

    scenario = parse_scenario(_dp_sat(**{"federation.clients_per_round": 2}))
    spec = scenario.attacks[0].model_copy(update={"rounds": [1, 2], "clients": [0, 3]})
    captured = [SimpleNamespace(round=1, partition_id=0), SimpleNamespace(round=2, partition_id=1)]
    got = not_attacked(scenario, spec, captured, {(2, 3): "boom"})
    assert set(got) == {(1, 3), (2, 0), (2, 3)}
    assert "not sampled in round 2" in got[(2, 0)] and "boom" in got[(2, 3)]
    every = spec.model_copy(update={"clients": "all"})
    assert set(not_attacked(scenario, every, captured, {(2, 3): "boom"})) == {(2, 3)}


def test_an_unsampled_target_is_reported_in_every_output(tmp_path: Path) -> None:
    """dp_sat with 2 of 4 clients a round: client 0 is not sampled in round 2 (the attacked round)."""
    from fedsim.run import run_scenario

    result = run_scenario(parse_scenario(_dp_sat(**{"federation.clients_per_round": 2})), tmp_path / "run")
    sampled = {c for per in result.client_metrics.get(2, {}) for c in [int(per)]}
    assert 0 not in sampled  # the premise
    assert len(result.outcomes) == 1 and "not sampled in round 2" in result.outcomes[0].failed
    metrics = jsonio.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert "not sampled in round 2" in metrics["attacks"][0]["failed"]
    summary = (tmp_path / "run" / "summary.md").read_text(encoding="utf-8")
    assert "No attack ran" not in summary and "client 0 was not sampled in round 2" in summary
    assert "not sampled in round 2" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_dp_frontier_shows_an_infinite_epsilon_as_inf_and_still_draws(tmp_path: Path) -> None:
    """A DP method with sigma = 0 (epsilon inf, as the bench now stores it) is a DP row showing inf in the
    table, and the log-scale figure leaves it out instead of failing."""
    from fedsim.report.dp_frontier import frontier_rows, row_cells, text_table
    from fedsim.report.dp_frontier_section import dp_frontier_plot

    def cell(defense: str, target: float | None, eps: float, repeat: int = 0) -> Cell:
        params = {} if target is None else {"defenses.0.params.target_epsilon": target}
        return Cell(f"{defense}{target}{repeat}", "ig", defense, params, repeat, repeat, "ok", None, 1.0, None,
                    {"epsilon": eps, "epsilon_level": "sample", "test_accuracy": 0.5 + eps / 100 if
                     math.isfinite(eps) else 0.9, "psnr_mean": 10.0})

    record = jsonio.loads(jsonio.dumps({"epsilon": math.inf}))  # what a strict cells.jsonl gives back
    cells = [cell("dp_sgd", 1.0, 1.0), cell("dp_sgd", 3.0, 3.0), cell("dp_sat", None, record["epsilon"])]
    rows = frontier_rows(cells)
    sat = next(r for r in rows if r.method == "dp_sat")
    assert sat.dp and sat.epsilon == math.inf
    assert row_cells(sat)[2] == "inf" and "inf" in text_table(rows)
    assert dp_frontier_plot(rows, tmp_path / "f.png")
