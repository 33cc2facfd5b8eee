"""``fedsim audit`` (fedsim/audit/cli.py), the report's "Is epsilon real?" section and scenarios/audit/*.yaml.

* every scenarios/audit yaml validates, and together they cover every DP path fedsim ships (+ the no-noise one);
* bad input: one line naming the YAML field, exit 2, nothing written (the --out folder untouched);
* one tiny end-to-end audit: the block is in metrics.json, its baseline accuracy equals an independent run of the
  same scenario and seed without canaries, and summary.md / report.html carry the section with the block's numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
AUDIT_DIR = ROOT / "scenarios" / "audit"
runner = CliRunner()

TINY = {  # 2 clients x 20 digits, 2 rounds of DP-SGD: a few seconds
    "name": "audit-tiny", "seed": 1, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 40, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": 2, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 5, "lr": 0.5}},
    "backend": {"kind": "inprocess"},
    "evaluation": {"every": 1},
    "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0e-5,
                                                "grad_sample_mode": "hooks", "poisson": True}}],
    "audit": {"canaries": 20, "level": "example"},
}


def write(tmp_path: Path, raw: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# -- scenarios/audit ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(AUDIT_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_audit_scenario_validates(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.audit is not None, f"{path.name} has no audit: block"
    assert scenario.name.startswith("audit-")


def test_the_audit_scenarios_cover_every_dp_path() -> None:
    """One scenario per DP path fedsim ships (ghost clipping, every DIFF2 noise placement, DP + SecAgg) and the
    no-noise one that shows the audit's power."""
    seen = set()
    for path in AUDIT_DIR.glob("*.yaml"):
        s = load_scenario(path)
        names = [d.name for d in s.defenses]
        dp = next(d for d in s.defenses if d.name != "secagg")
        params = dp.params if isinstance(dp.params, dict) else dp.params.model_dump()
        tag = dp.name
        if params.get("grad_sample_mode") == "ghost":
            tag += "+ghost"
        if dp.name == "diff2":
            tag += f"+{params['noise_placement']}"
        if "secagg" in names and dp.name != "diff2":
            tag += "+secagg"
        if params.get("noise_multiplier") == 0:
            tag += "+no_noise"
        seen.add(tag)
    assert seen >= {"dp_sgd", "dp_sgd+ghost", "central_dp", "dp_sat", "diff2+central", "diff2+local",
                    "diff2+distributed", "dp_sgd+secagg", "dp_sgd+no_noise"}, seen


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize(("args", "field"), [
    (["--canaries", "5"], "audit.canaries"),
    (["--level", "server"], "audit.level"),
    (["--confidence", "1.5"], "audit.confidence"),
    (["--set", "federation.rounds=0"], "federation.rounds"),
    (["--set", "audit.bogus=1"], "audit.bogus"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str], field: str) -> None:
    scenario = write(tmp_path, copy.deepcopy(TINY))
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    result = runner.invoke(app, ["audit", str(scenario), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.output, result.output
    assert sorted(tmp_path.iterdir()) == before  # no run directory, no .partial


def test_a_scenario_without_audit_block_gets_one_and_a_refused_out_dir_is_untouched(tmp_path: Path) -> None:
    raw = copy.deepcopy(TINY)
    del raw["audit"]
    scenario = write(tmp_path, raw)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not fedsim's")
    result = runner.invoke(app, ["audit", str(scenario), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2 and "--out" in result.output, result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "mine.partial").exists()
    from fedsim.audit.cli import load_audited

    assert load_audited(scenario, [], []).audit is not None  # the defaults of AuditSpec
    assert load_audited(scenario, [], ["audit.canaries=40"]).audit.canaries == 40


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope.yaml" in result.output and not (tmp_path / "o").exists()


# -- one tiny end-to-end audit --------------------------------------------------------------------------------------
def test_audit_writes_the_block_the_baseline_and_the_report_section(tmp_path: Path) -> None:
    from fedsim.run import run_scenario

    out = tmp_path / "run"
    result = runner.invoke(app, ["audit", str(write(tmp_path, copy.deepcopy(TINY))), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["audit"]
    for key in ("level", "mechanism", "epsilon", "epsilon_lower_bound", "epsilon_estimate", "verdict", "utility",
                "scores"):
        assert key in block, key
    assert block["level"] == "example" and block["mechanism"] == "dp_sgd" and block["canaries"] == 20
    # the baseline: an independent run of the same scenario and seed without canaries (not the CLI's own numbers)
    raw = copy.deepcopy(TINY)
    del raw["audit"]
    plain = run_scenario(parse_scenario(raw), write=False)
    expected = [h["test_accuracy"] for h in plain.history if "test_accuracy" in h][-1]
    u = block["utility"]
    assert u["baseline_test_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert u["test_accuracy"] == [h["test_accuracy"] for h in metrics["utility"] if "test_accuracy" in h][-1]
    assert u["accuracy_drop"] == pytest.approx(u["baseline_test_accuracy"] - u["test_accuracy"], abs=1e-12)
    # written once: no leftover .partial; the table printed
    assert not (tmp_path / "run.partial").exists() and "Is epsilon real?" in result.output
    summary = (out / "summary.md").read_text()
    assert "## Is epsilon real? (one-run audit)" in summary and f"{block['epsilon']['opacus']:.3f}" in summary
    assert f"{block['epsilon_lower_bound']['value']:.3f}" in summary and "without (same scenario and seed)" in summary
    assert (out / "audit_scores.png").is_file() and "audit_scores.png" in summary
    html = (out / "report.html").read_text()
    assert 'id="audit"' in html and "Is epsilon real?" in html and "data:image/png;base64," in html
    assert f"{block['epsilon_estimate']['value']:.3f}" in html


def test_fedsim_run_with_an_audit_block_reports_no_baseline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, copy.deepcopy(TINY))), "--out", str(out)])
    assert result.exit_code == 0, result.output
    block = json.loads((out / "metrics.json").read_text())["audit"]
    assert block["utility"]["baseline_test_accuracy"] is None and block["utility"]["accuracy_drop"] is None
    summary = (out / "summary.md").read_text()
    assert "## Is epsilon real?" in summary and "without them not measured" in summary


def test_no_audit_block_no_section(tmp_path: Path) -> None:
    from fedsim.report.audit import audit_markdown, audit_section

    assert audit_markdown(None) == [] and audit_section({"utility": []}, tmp_path) == ""


def test_report_section_escapes_and_words_a_violation(tmp_path: Path) -> None:
    from fedsim.report.audit import VIOLATION, audit_section

    block = {"level": "client", "mechanism": "<script>x</script>", "canaries": 20, "canaries_in": 9,
             "confidence": 0.95, "delta": 1e-5, "epsilon": {"opacus": 1.0, "dp_accounting_rdp": 1.0,
                                                              "dp_accounting_pld": 0.9},
             "epsilon_lower_bound": {"value": 2.0, "guesses": 5, "correct": 5, "method": "m"},
             "epsilon_estimate": {"value": 3.0, "ci": [1.0, 5.0], "method": "g"}, "verdict": "violation",
             "utility": {"test_accuracy": 0.5}, "scores": {"in": [0.3, 0.4], "out": [0.0, 0.1]}}
    html = audit_section({"audit": block}, tmp_path)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert VIOLATION.replace("'", "&#x27;") in html and 'class="bad"' in html


def test_the_canaries_cost_is_worded_for_every_case() -> None:
    from fedsim.report.audit import utility_text

    both = utility_text({"utility": {"test_accuracy": 0.5, "baseline_test_accuracy": 0.625, "accuracy_drop": 0.125}})
    assert "0.500 with the canaries, 0.625 without" in both and "drop 0.125" in both
    assert "without them not measured" in utility_text({"utility": {"test_accuracy": 0.5}})
    assert "no accuracy" in utility_text({"utility": {"test_accuracy": None}})


def test_every_figure_says_whether_it_is_a_bound_or_an_estimate() -> None:
    """summary.md / report.html rows and the CLI table label the lower bound a bound and both estimates not bounds,
    and say in one line that only the bound can prove anything."""
    from rich.console import Console

    from fedsim.audit.cli import audit_table
    from fedsim.report.audit import READING, audit_markdown

    block = {"level": "client", "mechanism": "central_dp", "canaries": 20, "canaries_in": 9, "confidence": 0.95,
             "delta": 1e-5, "epsilon": {"opacus": 2.0, "dp_accounting_rdp": 2.1, "dp_accounting_pld": 1.9},
             "epsilon_lower_bound": {"value": 0.2, "guesses": 5, "correct": 4, "method": "m"},
             "epsilon_estimate": {"value": 1.1, "ci": [0.5, 1.6], "method": "pooled"},
             "epsilon_estimate_two_variance": {"value": 4.2, "ci": [1.4, 7.8], "method": "two"},
             "verdict": "consistent", "utility": {"test_accuracy": 0.5}}
    lines = audit_markdown(block)
    assert any(line.startswith("- empirical lower bound (a bound): 0.200") for line in lines)
    assert any(line.startswith("- estimate (not a bound): 1.100 [0.500, 1.600]") for line in lines)
    assert any(line.startswith("- two-variance estimate (not a bound, biased up): 4.200") for line in lines)
    assert f"- how to read: {READING}" in lines and "only the lower bound proves anything" in READING
    console = Console(width=200, record=True)
    console.print(audit_table(block))
    text = console.export_text()
    assert "lower bound @ 95%" in text and "1.100 [0.500, 1.600] (pooled Gaussian fit; not a bound)" in text
    assert "4.200 [1.400, 7.800] (Andrew et al.; not a bound, biased up)" in text
    assert "Only the lower bound proves anything" in text


@pytest.mark.slow
def test_step11_teaches_its_lesson(tmp_path: Path) -> None:
    """Tutorial step 11 as shipped and scenarios/audit/no_noise.yaml (docs/tutorial.md quotes both, seed 0): with
    sigma 1 the bound stays below every accountant's epsilon (measured 0.00 vs 9.09 / 9.10 / 8.08) and the canaries
    cost accuracy (0.394 -> 0.325); with sigma 0 the audit has power: the bound is above 2 (measured 2.64; 100
    canaries can show at most 2.87) and the pooled estimate above 10 (33.5)."""
    out = tmp_path / "tut11"
    result = runner.invoke(app, ["audit", str(ROOT / "scenarios" / "tutorial" / "11_is_my_epsilon_real.yaml"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    block = json.loads((out / "metrics.json").read_text())["audit"]
    eps = block["epsilon"]
    assert block["verdict"] == "consistent"
    assert block["epsilon_lower_bound"]["value"] < min(eps.values())
    assert eps["opacus"] == pytest.approx(9.09, abs=0.01)  # the figure docs/tutorial.md quotes
    assert block["utility"]["accuracy_drop"] > 0.02
    from fedsim.run import run_scenario

    loud = run_scenario(load_scenario(AUDIT_DIR / "no_noise.yaml"), write=False).audit
    assert loud["epsilon_lower_bound"]["value"] > 2.0 and loud["epsilon_estimate"]["value"] > 10.0
