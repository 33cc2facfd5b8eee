"""Input that used to be accepted silently or refused with a misleading line (issue 15 QA):

* a bench grid given to a scenario command (validate / run / audit): one line saying it is a grid, exit 2; a
  scenario given to ``fedsim bench``: one line saying it is a scenario;
* ``fedsim bench --dry-run``: every cell expanded and validated, nothing run or written;
* a ``--set base.PATH`` the grid sets again in every cell: refused at that path, exit 2;
  in only some cells: one warning line;
* a union field with a constrained member (``Literal['auto'] | Annotated[int, Field(ge=0, le=15)]``): the line
  names every accepted form, not only the first (fedleak's ``median``: tests/test_fedleak.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import BaseModel, Field, ValidationError
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import _first_error, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def grid(tiny: dict[str, Any]) -> dict[str, Any]:
    """2 attack entries x 2 defense entries x batch size 1, 2; a learning-rate axis only for the 'dp' entry."""
    return {"name": "t", "base": tiny,
            "attacks": ["inverting_gradients",
                        {"label": "ig-known", "name": "inverting_gradients", "knowledge": {"labels": "known"}}],
            "defenses": ["none", {"label": "dp", "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1}}]}],
            "sweep": {"federation.local.batch_size": [1, 2],
                      "federation.local.lr": {"values": [0.1, 0.2], "defenses": ["dp"]}}}


def write(tmp_path: Path, raw: dict[str, Any], name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# -- a grid given to a scenario command ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["validate"], ["run", "--out", "OUT"], ["audit", "--out", "OUT"]])
def test_a_grid_given_to_a_scenario_command_says_use_bench(tmp_path: Path, tiny_raw, command: list[str]) -> None:
    path = write(tmp_path, grid(tiny_raw))
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    result = runner.invoke(app, [args[0], str(path), *args[1:]])
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    assert "bench grid" in line and "fedsim bench" in line and "base" in line and "sweep" in line, line
    assert not (tmp_path / "out").exists()


def test_a_scenario_given_to_bench_says_use_run(tmp_path: Path, tiny_raw) -> None:
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(write(tmp_path, tiny_raw, "s.yaml")), "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    assert "is a scenario" in line and "fedsim run" in line, line
    assert not out.exists()


def test_the_shipped_grids_are_told_apart_from_scenarios() -> None:
    for path in sorted((ROOT / "benchmarks" / "grids").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        with pytest.raises(ScenarioError, match="bench grid"):
            parse_scenario(raw)


# -- fedsim bench --dry-run ------------------------------------------------------------------------------------------
def test_bench_dry_run_validates_every_cell_and_writes_nothing(tmp_path: Path, tiny_raw) -> None:
    path = write(tmp_path, grid(tiny_raw))
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(path), "--dry-run", "--executor", "serial", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 cells validated" in result.output and "nothing run or written" in result.output  # 2 x (2 + 2 x 2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]
    bad = grid(tiny_raw)
    bad["sweep"]["federation.local.lr"]["values"] = [0.1, -1.0]  # only the 'dp' cells see the bad value
    result = runner.invoke(app, ["bench", str(write(tmp_path, bad)), "--dry-run", "--out", str(out)])
    assert result.exit_code == 2 and "sweep.federation.local.lr[1]" in one_line(result.output), result.output
    assert not out.exists()


# -- a --set the grid overrides -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "setter"), [
    ("base.federation.local.batch_size=4", "sweep.federation.local.batch_size"),  # every cell sweeps it
    ("base.defenses=[{name: gaussian_noise}]", "(defenses)"),  # every defense entry replaces the list
])
def test_a_set_the_grid_replaces_in_every_cell_is_refused(tmp_path: Path, tiny_raw, override: str,
                                                         setter: str) -> None:
    path = write(tmp_path, grid(tiny_raw))
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", str(path), "--executor", "serial", "--out", str(out), "--set", override])
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    assert line.startswith(f"error: {override.split('=')[0]}: --set has no effect") and setter in line, line
    assert not out.exists()


def test_a_set_the_grid_replaces_in_some_cells_is_warned_about(tmp_path: Path, tiny_raw) -> None:
    path = write(tmp_path, grid(tiny_raw))
    result = runner.invoke(app, ["bench", str(path), "--dry-run", "--set", "base.federation.local.lr=0.3"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "federation.local.lr" in warning[0] and "8 of 12 cells" in warning[0], warning
    for free in ("base.federation.rounds=2", "base.federation.local={batch_size: 4, lr: 0.1, steps: 1}"):
        result = runner.invoke(app, ["bench", str(path), "--dry-run", "--set", free])  # a parent: steps is kept
        assert result.exit_code == 0 and "warning" not in result.output, result.output


# -- union fields name every accepted form -------------------------------------------------------------------------
class _Union(BaseModel):
    size: Literal["auto"] | Annotated[int, Field(ge=0, le=15)] = "auto"


@pytest.mark.parametrize(("value", "second"), [("abc", "a valid integer"), (16, "less than or equal to 15"),
                                               (-1, "greater than or equal to 0")])
def test_a_union_with_a_constrained_member_names_both_forms(value: object, second: str) -> None:
    with pytest.raises(ValidationError) as err:
        _Union.model_validate({"size": value})
    error = _first_error(err.value)
    assert error.path == "size" and "'auto'" in error.reason and second in error.reason, error

