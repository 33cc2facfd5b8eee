"""The canaries' cost in utility (QA 15 findings 3, 4, 7, 8): every task reports it in test loss, beside accuracy
where it exists; an accuracy comparison near chance is called uninformative; ``fedsim run`` prints the audit's
bound and verdict; the labels say what each figure is.

Expected values come from an independent run of the same scenario and seed without canaries (``run_scenario`` on
the scenario without its ``audit:`` block), not from the CLI's own baseline run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.scenario import parse_scenario

runner = CliRunner()

REGRESSION = {  # 2 clients of scikit-learn's diabetes, 2 rounds of DP-SGD: a few seconds
    "name": "audit-regression-tiny", "seed": 0, "device": "cpu",
    "data": {"dataset": "diabetes", "test_fraction": 0.2, "partition": {"kind": "iid"}},
    "model": {"name": "fc10"},
    "federation": {"clients": 2, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 8, "lr": 0.2}},
    "backend": {"kind": "inprocess"},
    "evaluation": {"every": 1},
    "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0e-5,
                                                "grad_sample_mode": "hooks", "poisson": True}}],
    "audit": {"canaries": 20, "level": "example"},
}
CLASSIFICATION = {  # 2 clients x 20 digits, 2 rounds of DP-SGD (as tests/test_audit_cli.py's TINY)
    **copy.deepcopy(REGRESSION), "name": "audit-digits-tiny", "seed": 1,
    "data": {"dataset": "digits", "train_subset": 40, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": 2, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 5, "lr": 0.5}},
}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _independent_last(raw: dict, key: str) -> float:
    from fedsim.run import run_scenario

    plain = copy.deepcopy(raw)
    del plain["audit"]
    return [h[key] for h in run_scenario(parse_scenario(plain), write=False).history if key in h][-1]


def test_a_regression_audit_reports_the_test_mse_with_and_without_canaries(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["audit", str(_write(tmp_path, REGRESSION)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    u = metrics["audit"]["utility"]
    assert u["test_accuracy"] is None and u["chance_accuracy"] is None  # a regression: no accuracy, no classes
    assert u["baseline_test_loss"] == pytest.approx(_independent_last(REGRESSION, "test_loss"), abs=1e-12)
    assert u["test_loss"] == [h["test_loss"] for h in metrics["utility"] if "test_loss" in h][-1]
    assert u["loss_increase"] == pytest.approx(u["test_loss"] - u["baseline_test_loss"], abs=1e-12)
    summary = (out / "summary.md").read_text()
    assert f"test MSE {u['test_loss']:.4f} with the canaries, {u['baseline_test_loss']:.4f} without" in summary
    assert "test MSE without" in result.output and f"{u['baseline_test_loss']:.4f}" in result.output


def test_a_classification_audit_reports_the_test_loss_beside_the_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["audit", str(_write(tmp_path, CLASSIFICATION)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    u = json.loads((out / "metrics.json").read_text())["audit"]["utility"]
    assert u["baseline_test_loss"] == pytest.approx(_independent_last(CLASSIFICATION, "test_loss"), abs=1e-12)
    assert u["chance_accuracy"] == pytest.approx(1 / 10)  # digits: ten classes
    assert isinstance(u["test_accuracy"], float) and isinstance(u["baseline_test_accuracy"], float)


def _block(acc: float | None, base: float | None, chance: float | None = 0.1) -> dict:
    return {"level": "client", "mechanism": "central_dp", "canaries": 20, "canaries_in": 9, "confidence": 0.95,
            "delta": 1e-5, "epsilon": {"opacus": 2.0, "dp_accounting_rdp": 2.1, "dp_accounting_pld": 1.9},
            "epsilon_lower_bound": {"value": 0.2, "guesses": 5, "correct": 4, "method": "m"},
            "epsilon_estimate": {"value": 1.1, "ci": [0.5, 1.6], "method": "pooled"}, "verdict": "consistent",
            "utility": {"test_accuracy": acc, "baseline_test_accuracy": base,
                        "accuracy_drop": None if acc is None or base is None else base - acc,
                        "chance_accuracy": chance, "test_loss": 2.3, "baseline_test_loss": 2.25,
                        "loss_increase": 0.05}}


def _table_text(block: dict) -> str:
    from fedsim.audit.cli import audit_table

    console = Console(width=200, record=True)
    console.print(audit_table(block))
    return console.export_text()


@pytest.mark.parametrize(("acc", "base"), [(0.119, 0.083), (0.0, 0.0)])  # QA: central_dp at chance, 4 test images
def test_an_accuracy_comparison_near_chance_is_called_uninformative(acc: float, base: float) -> None:
    from fedsim.report.audit import utility_text

    text = utility_text(_block(acc, base))
    assert "uninformative" in text and "drop" not in text, text
    table = _table_text(_block(acc, base))
    assert "uninformative" in table and "(drop" not in table, table


@pytest.mark.parametrize(("acc", "base"), [(0.61, 0.70), (0.149, 0.16)])  # one of them at 1.5x chance or above
def test_an_accuracy_comparison_above_chance_shows_the_drop(acc: float, base: float) -> None:
    from fedsim.report.audit import utility_text

    text = utility_text(_block(acc, base))
    assert f"drop {base - acc:.3f}" in text and "uninformative" not in text, text
    assert f"(drop {base - acc:.3f})" in _table_text(_block(acc, base))


def test_the_loss_rows_say_increase_and_the_bound_row_has_no_shouted_label() -> None:
    table = _table_text(_block(0.61, 0.70))
    assert "test loss with canaries" in table and "(increase 0.0500)" in table
    assert "BOUND:" not in table and "lower bound @ 95%" in table and "a bound" in table


def test_fedsim_run_prints_the_audit_bound_and_verdict(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(_write(tmp_path, CLASSIFICATION)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    block = json.loads((out / "metrics.json").read_text())["audit"]
    low = min(block["epsilon"].values())
    line = next((x for x in result.output.splitlines() if x.startswith("audit (example canaries)")), None)
    assert line is not None, result.output
    assert f"lower bound {block['epsilon_lower_bound']['value']:.3f} at 95% confidence" in line
    assert f"vs smallest accountant epsilon {low:.3f}: {block['verdict']}" in line


def test_the_summary_words_the_canary_norm_as_the_clipped_norm_beside_the_raw_10x() -> None:
    from fedsim.report.audit import audit_items

    block = {**_block(0.6, 0.7), "level": "example", "mechanism": "dp_sgd", "canary_norm": 1.0,
             "canaries_clipped_by_mechanism": True}
    mech = dict(audit_items(block))["mechanism"]
    assert "norm 10x the clipping norm" in mech and "canary norm 1.0" not in mech
    assert "norm once clipped, the accounted sensitivity C: 1.0" in mech
