"""fedsim deletes or overwrites only what it wrote itself (issue 11, item 6).

The kind: any removal or overwrite of a path fedsim did not create. fedsim marks every directory it
creates (``fedsim.outputs.MARKER``) and files it writes carry their own signature (a prior's format
field, the report's generator meta tag, the sample PNG's text chunk); anything else in the way is
refused with one line and exit code 2, before any work, and left exactly as it was. Paths that come
from files or names (``cells.jsonl`` run dirs, scenario/grid/prior names used in default paths) stay
inside their directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

runner = CliRunner()


def _scenario(tmp_path: Path, **changes: Any) -> Path:
    raw = copy.deepcopy(TINY)
    raw["attacks"][0]["budget"]["iterations"] = 2
    raw.update(changes)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(result) -> str:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_run_out_naming_a_users_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3")
    before = _tree(out)
    text = _one_line_exit_2(runner.invoke(app, ["run", str(_scenario(tmp_path)), "--out", str(out)]))
    assert str(out) in text
    assert _tree(out) == before
    assert not (tmp_path / "mine.partial").exists()


def test_overwrite_replaces_a_fedsim_run_directory_only(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(scenario), "--out", str(out)]).exit_code == 0
    first = (out / "metrics.json").read_bytes()
    # without --overwrite: refused, the earlier run kept byte for byte
    _one_line_exit_2(runner.invoke(app, ["run", str(scenario), "--out", str(out)]))
    assert (out / "metrics.json").read_bytes() == first
    # with --overwrite: replaced (an extra file of the old run is gone with it)
    (out / "old-note.txt").write_text("x")
    result = runner.invoke(app, ["run", str(scenario), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and not (out / "old-note.txt").exists()
    # --overwrite on a directory fedsim did not write: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    (mine / "metrics.json").write_text("{}")  # looking like a run directory is not enough
    before = _tree(mine)
    _one_line_exit_2(runner.invoke(app, ["run", str(scenario), "--out", str(mine), "--overwrite"]))
    assert _tree(mine) == before


def test_an_empty_directory_may_become_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    result = runner.invoke(app, ["run", str(_scenario(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file()


def test_a_users_directory_named_like_fedsims_partial_is_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "keep.txt").write_text("keep")
    _one_line_exit_2(runner.invoke(app, ["run", str(_scenario(tmp_path)), "--out", str(tmp_path / "run")]))
    assert (tmp_path / "run.partial" / "keep.txt").read_text() == "keep"
    assert not (tmp_path / "run").exists()


def test_write_run_dir_refuses_a_users_directory_directly(tmp_path: Path) -> None:
    """The library call (not just the CLI) refuses, so no caller can skip the check."""
    from fedsim.errors import FedsimError
    from fedsim.report import write_run_dir

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(FedsimError, match="not a fedsim run directory|exists"):
        write_run_dir(out, parse_scenario(copy.deepcopy(TINY)), [], [], {"total_s": 0.0}, overwrite=True)
    assert (out / "keep.txt").read_text() == "keep" and not (tmp_path / "mine.partial").exists()


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "/abs", "x\\..\\y", ""])
def test_a_scenario_name_that_would_leave_output_dir_is_refused_at_validation(name: str) -> None:
    raw = copy.deepcopy(TINY)
    raw["name"] = name
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "name"


def test_grid_and_prior_names_are_confined_too(tmp_path: Path) -> None:
    from fedsim.bench.grid import parse_grid
    from fedsim.priors.config import parse_prior_config

    with pytest.raises(ScenarioError) as err:
        parse_grid({"name": "../../tmp/x", "base": copy.deepcopy(TINY), "attacks": ["inverting_gradients"]})
    assert err.value.path == "name"
    with pytest.raises(ScenarioError) as err:
        parse_prior_config({"name": "../evil"})
    assert err.value.path == "name"


def test_bench_out_naming_a_users_directory_is_refused(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": copy.deepcopy(TINY), "attacks": ["inverting_gradients"],
                                    "overrides": {"attacks.0.budget.iterations": 1}}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "grid.yaml").write_text("my own grid notes")
    (mine / "cells").mkdir()
    (mine / "cells" / "x.partial").mkdir()
    (mine / "cells" / "x.partial" / "keep.txt").write_text("keep")
    before = _tree(mine)
    _one_line_exit_2(runner.invoke(app, ["bench", str(grid), "--out", str(mine), "--executor", "serial"]))
    assert _tree(mine) == before and not (mine / ".lock").exists()


def test_bench_keeps_an_unmarked_partial_and_cleans_its_own(tmp_path: Path) -> None:
    from fedsim.outputs import new_owned_dir

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": copy.deepcopy(TINY), "attacks": ["inverting_gradients"],
                                    "overrides": {"attacks.0.budget.iterations": 1}}))
    out = tmp_path / "bench"
    args = ["bench", str(grid), "--out", str(out), "--executor", "serial"]
    assert runner.invoke(app, args).exit_code == 0
    new_owned_dir(out / "cells" / "aaaaaaaaaaaa.partial", "run")  # fedsim's own, left by a killed run
    (out / "cells" / "bbbbbbbbbbbb.partial").mkdir()  # someone else's
    (out / "cells" / "bbbbbbbbbbbb.partial" / "keep.txt").write_text("keep")
    assert runner.invoke(app, args).exit_code == 0
    assert not (out / "cells" / "aaaaaaaaaaaa.partial").exists()
    assert (out / "cells" / "bbbbbbbbbbbb.partial" / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("run_dir", ["../victim", "/etc", "cells/../../victim"])
def test_a_poisoned_cells_jsonl_run_dir_is_refused(tmp_path: Path, run_dir: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.json").write_text(json.dumps({"utility": [], "attacks": []}))
    bench = tmp_path / "bench"
    bench.mkdir()
    record = {"cell_id": "c1", "attack": "inverting_gradients", "defense": "none", "params": {}, "repeat": 0,
              "seed": 0, "status": "ok", "error": None, "seconds": 1.0, "run_dir": run_dir, "summary": {}}
    (bench / "cells.jsonl").write_text(json.dumps(record) + "\n")
    text = _one_line_exit_2(runner.invoke(app, ["report", str(bench)]))
    assert "run_dir" in text and "line 1" in text
    assert not (bench / "report.html").exists()


def test_report_out_never_overwrites_a_users_file_or_folder(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(scenario), "--out", str(run)]).exit_code == 0
    page = tmp_path / "notes.html"
    page.write_text("<html>my notes</html>")
    _one_line_exit_2(runner.invoke(app, ["report", str(run), "--out", str(page)]))
    assert page.read_text() == "<html>my notes</html>" and not (tmp_path / "notes").exists()
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "leaderboard.csv").write_text("mine")  # looking like a report folder is not enough
    _one_line_exit_2(runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")]))
    assert (folder / "leaderboard.csv").read_text() == "mine" and not (tmp_path / "r.html").exists()
    # fedsim's own report is rewritten in place
    again = runner.invoke(app, ["report", str(run)])
    assert again.exit_code == 0, again.output
    again = runner.invoke(app, ["report", str(run)])
    assert again.exit_code == 0, again.output


def test_prior_train_and_sample_never_overwrite_a_users_file(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"name": "p", "data": {"dataset": "digits", "start": 0, "stop": 64},
                                      "model": {"latent_dim": 4, "width": 4},
                                      "training": {"steps": 2, "batch_size": 8, "checkpoint_every": 1}}))
    mine = tmp_path / "weights.pt"
    mine.write_bytes(b"my own model")
    _one_line_exit_2(runner.invoke(app, ["prior", "train", str(config), "--out", str(mine), "--fresh"]))
    assert mine.read_bytes() == b"my own model"
    ckpt_owner = tmp_path / "p.pt"
    (tmp_path / "p.pt.ckpt").write_bytes(b"not a checkpoint")
    _one_line_exit_2(runner.invoke(app, ["prior", "train", str(config), "--out", str(ckpt_owner), "--fresh"]))
    assert (tmp_path / "p.pt.ckpt").read_bytes() == b"not a checkpoint" and not ckpt_owner.exists()
    good = tmp_path / "good.pt"
    assert runner.invoke(app, ["prior", "train", str(config), "--out", str(good)]).exit_code == 0
    assert runner.invoke(app, ["prior", "train", str(config), "--out", str(good), "--fresh"]).exit_code == 0
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (3, 3), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    _one_line_exit_2(runner.invoke(app, ["prior", "sample", str(good), "--out", str(photo), "--n", "4"]))
    assert photo.read_bytes() == before
    grid = tmp_path / "grid.png"
    assert runner.invoke(app, ["prior", "sample", str(good), "--out", str(grid), "--n", "4"]).exit_code == 0
    assert runner.invoke(app, ["prior", "sample", str(good), "--out", str(grid), "--n", "4"]).exit_code == 0


def test_teaching_figure_folder_refuses_a_users_directory(tmp_path: Path) -> None:
    from fedsim.teaching.dia_figure import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dia_sweep.png").write_bytes(b"my own figure")
    with pytest.raises(SystemExit) as err:
        main(["--out", str(mine)])
    assert err.value.code == 2 and (mine / "dia_sweep.png").read_bytes() == b"my own figure"


def test_the_evaluator_cache_never_replaces_a_file_fedsim_did_not_write(tmp_path: Path, monkeypatch) -> None:
    import fedsim.metrics.evaluator as evaluator_mod
    from fedsim.scenario import DataSpec

    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    first = evaluator_mod.load_evaluator(DataSpec(dataset="digits"))
    first.path.write_bytes(b"someone else's file under that name")
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    with pytest.warns(UserWarning, match="not cached"):
        second = evaluator_mod.load_evaluator(DataSpec(dataset="digits"))
    assert first.path.read_bytes() == b"someone else's file under that name"
    assert second.accuracy == first.accuracy  # retrained (deterministic), just not cached
