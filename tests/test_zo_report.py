"""What a zeroth-order run's outputs say (summary.md, report.html, leaderboard.csv, metrics.json): they describe the
zeroth-order run (threat model, objective against queries, attacks per round, caveats) and nothing of the image
attacks', tolerate undefined numbers, and never count or tabulate attacks that did not run."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from fedsim import jsonio
from fedsim.cli import app
from fedsim.errors import FedsimError
from fedsim.report.html import render_report
from fedsim.scenario import parse_scenario
from fedsim.zo.api import FederatedObjective, ZORoundView
from fedsim.zo.attacks import score_round
from fedsim.zo.rff import RFFBasis
from fedsim.zo.run import run_zo_scenario

TINY = {
    "name": "zo-report", "seed": 0,
    "federation": {"protocol": "zeroth_order", "clients": 3, "rounds": 2},
    "backend": {"kind": "inprocess"},
    "zeroth_order": {
        "task": {"family": "quadratic", "dim": 6}, "method": "fzoos", "local_iters": 2,
        "fzoos": {"n_inits": 8, "gp_points": 20, "gp_restarts": 0, "explore_candidates": 10, "explore_top": 1,
                  "rff_features": 100, "rff_points": 30, "refresh_candidates": 10, "refresh_top": 3},
        "attacks": {"heldout_points": 37},
    },
}


def tiny(clients: int = 3, **zo: object) -> dict:
    raw = copy.deepcopy(TINY)
    raw["federation"]["clients"] = clients
    raw["zeroth_order"].update(zo)
    if raw["zeroth_order"]["method"] != "fzoos":
        del raw["zeroth_order"]["fzoos"]
    return raw


IMAGE_ONLY = ("PSNR", "(no attack)", "No round was evaluated", "attacked one round", "32x32", "Reconstructions",
              "frontier")


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):  # noqa: ANN001, ANN201
    out = tmp_path_factory.mktemp("zo") / "run"
    run_zo_scenario(parse_scenario(tiny(defenses={"secagg": True})), out)
    return out


# ---------------------------------------------------------------- kind: report.html of a zo run is its own report

def test_report_html_and_leaderboard_describe_the_zeroth_order_run(secagg_run) -> None:  # noqa: ANN001
    doc = (secagg_run / "report.html").read_text()
    for text in IMAGE_ONLY:  # the gradient-inversion report's sections do not apply
        assert text not in doc, text
    assert "Objective and queries" in doc and "What the server learned" in doc and "How to read this" in doc
    assert "R\u00b2" in doc and "label set" not in doc.split("How to read this")[0]  # quadratic: no label columns
    with (secagg_run / "report" / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["attack"] for r in rows} == {"function extraction"} and {r["defense"] for r in rows} == {"secagg"}
    assert {r["rounds_attacked"] for r in rows} == {"2"}


# ---------------------------------------------------------------- kinds: threat model, SecAgg caveat, held-out count

def test_threat_model_secagg_caveat_and_heldout_count_in_summary_and_report(secagg_run) -> None:  # noqa: ANN001
    for name in ("summary.md", "report.html"):
        text = (secagg_run / name).read_text()
        assert "honest-but-curious" in text and "RFF seed" in text and "keeps every" in text, name
        assert "pairwise masking" in text and "no dropout recovery" in text, name  # the simulation caveat
        assert "at 37 random held-out points" in text and "200 random" not in text, name


# ---------------------------------------------------------------- kind: undefined numbers never stop a report

def _blank(row: dict, blank: float | None) -> dict:
    return {k: (v if k == "round" else blank) for k, v in row.items()}


@pytest.mark.parametrize("blank", [None, float("nan")])
def test_null_or_nan_in_every_number_gives_dashes_not_a_crash(secagg_run, tmp_path, blank) -> None:  # noqa: ANN001
    from fedsim.report.summary import summary_markdown

    metrics = json.loads((secagg_run / "metrics.json").read_text())
    history = [_blank(h, blank) for h in metrics["utility"]]
    history[-1]["zo_extraction_flat_clients"] = 3.0  # every client flat: R^2 undefined, said so
    history[-1]["zo_attacked_clients"] = 3.0
    history[-1]["zo_success"] = 1.0
    scenario = parse_scenario(tiny(defenses={"secagg": True}))
    md = summary_markdown(scenario, history, [], {"federation_s": 1.0}, {})
    assert "\u2014 (flat f_i)" in md  # QA2 6: null is not recorded, NaN is not finite
    assert ("\u2014 (not recorded)" if blank is None else "\u2014 (not finite)") in md
    run = tmp_path / "blank"
    run.mkdir()
    for name in ("scenario.yaml", ".fedsim-output"):
        if (secagg_run / name).exists():
            (run / name).write_bytes((secagg_run / name).read_bytes())
    (run / "metrics.json").write_text(jsonio.dumps({**metrics, "utility": history}), encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = (run / "report.html").read_text()
    assert "\u2014 (flat f_i)" in doc


def test_a_report_failure_is_in_every_output_and_not_exit_0(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import fedsim.report.writer as writer

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise TypeError("drawing bug")

    monkeypatch.setattr(writer, "render_report", broken)
    out = tmp_path / "run"
    with pytest.raises(FedsimError, match="report.html could not be drawn: TypeError: drawing bug"):
        run_zo_scenario(parse_scenario(tiny(clients=2)), out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "drawing bug" in metrics["report_error"]
    assert "drawing bug" in (out / "summary.md").read_text()
    assert "drawing bug" in (out / "report.html").read_text()
    assert not out.with_name("run.partial").exists()  # nothing half-written left behind


def test_a_report_failure_exits_1_not_the_bad_input_code(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A drawing bug is fedsim's fault, not the user's: one line and exit 1 (bad input is 2)."""
    import yaml

    import fedsim.report.writer as writer

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise TypeError("drawing bug")

    monkeypatch.setattr(writer, "render_report", broken)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(clients=2)), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "drawing bug" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- kind: attacks that did not run are not counted

def test_a_baseline_without_an_applicable_attack_has_no_attack_keys_or_table(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "fedzo"
    result = run_zo_scenario(parse_scenario(tiny(method="fedzo", rgf={"directions": 3})), out)
    assert not any(k.startswith(("zo_attacked", "zo_extraction", "zo_label", "zo_is_masked"))
                   for h in result.history for k in h)
    for name in ("summary.md", "report.html"):
        text = (out / name).read_text()
        assert "No attack ran on these messages (fedzo sends x_i" in text, name
        assert "extraction R\u00b2 (fit box)" not in text and "Extraction: the server" not in text, name


def test_attacks_off_are_said_off_and_not_counted(tmp_path) -> None:  # noqa: ANN001
    raw = tiny(clients=2)
    raw["zeroth_order"]["attacks"] = {"function_extraction": False, "heldout_points": 5}
    result = run_zo_scenario(parse_scenario(raw), tmp_path / "off")
    assert not any("zo_attacked_clients" in h for h in result.history)
    assert "function extraction is off" in (tmp_path / "off" / "summary.md").read_text()


def _labels_objective() -> FederatedObjective:
    held = [[0, 1], [2, 3]]

    def make(h: list[int]):  # noqa: ANN202
        sign = torch.ones(4, dtype=torch.float64)
        sign[h] = -1.0
        return lambda x: (x[:, :4] * sign).sum(1)

    obj = FederatedObjective(name="labels", dim=6, x0=torch.full((6,), 0.5, dtype=torch.float64),
                             clients=[make(h) for h in held], weights=[0.5, 0.5])
    obj.truth = {"classes": held, "bias_slice": (0, 4)}
    return obj


def test_step_label_attack_on_a_baseline_counts_its_clients() -> None:
    """scaffold1 on the metric task sends no surrogate, but its local steps are attacked: counted, not 0."""
    center = torch.full((6,), 0.5, dtype=torch.float64)
    local = {0: center + 0.01, 1: center - 0.01}
    view = ZORoundView(round=1, x_r=center, x_next=center, local=local)
    out = score_round(view, RFFBasis(6, 50, 1.0, 0), _labels_objective(), heldout=5)
    assert out["zo_attacked_clients"] == 2.0 == len(local)
    assert "zo_label_set_step_accuracy_mean" in out and "zo_is_masked" in out and "zo_masked_messages" not in out
    assert score_round(view, RFFBasis(6, 50, 1.0, 0), _labels_objective(), label_set=False) == {}


# ---------------------------------------------------------------- kinds: success, one client, chance 1.0

def test_success_round_one_client_secagg_and_chance_one_are_stated(tmp_path) -> None:  # noqa: ANN001
    from fedsim.report.summary import summary_markdown

    raw = tiny(clients=1, defenses={"secagg": True})
    out = tmp_path / "one"
    run_zo_scenario(parse_scenario(raw), out)
    history = [{"round": 0, "zo_objective": 1.0, "zo_queries": 3, "zo_success": 0},
               {"round": 1, "zo_objective": 0.5, "zo_queries": 9, "zo_success": 0, "zo_attacked_clients": 1,
                "zo_label_set_accuracy_mean": 1.0, "zo_label_set_chance": 1.0},
               {"round": 2, "zo_objective": -0.25, "zo_queries": 15, "zo_success": 1}]
    md = summary_markdown(parse_scenario(raw), history, [], {"federation_s": 1.0}, {})
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(jsonio.dumps({**metrics, "utility": history}), encoding="utf-8")
    doc = render_report(out).read_text()
    for text in (md, doc):
        assert "first reached in round 2" in text and "F = -0.25" in text
        assert "SecAgg over 1 client hides nothing" in text
        assert "1.000 (meaningless: chance 1.0)" in text
    with (out / "report" / "leaderboard.csv").open() as fh:
        notes = [r["note"] for r in csv.DictReader(fh)]
    assert notes and all("meaningless: chance 1.0" in n and "1 client hides nothing" in n for n in notes)
    never = [{**h, "zo_success": 0} for h in history]
    assert "not reached in 3 evaluated round(s)" in summary_markdown(parse_scenario(raw), never, [], {}, {})


def test_tutorial_step_9_states_fedsims_query_count_rule() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "tutorial.md").read_text()
    assert "22 queries a step" not in text
    assert "21 queries a step" in text and "T (q + 1)" in text


# ------------------------- QA2 kind: a text about what is sent or public must follow the run's method and safeguard

@pytest.mark.parametrize("method", ["fzoos", "fedzo", "fedprox", "scaffold1", "scaffold2"])
@pytest.mark.parametrize("safeguard", ["message", "off"])
def test_message_texts_name_only_what_this_method_and_safeguard_send(method: str, safeguard: str) -> None:
    from fedsim.zo.report import RunInfo, attack_reading, run_notes, threat_model

    info = RunInfo(method=method, family="metric", clients=3, safeguard=safeguard,
                   defenses={"secagg": True} if method == "fzoos" else None)
    rows = [{"round": 1, "zo_attacked_clients": 3.0, "zo_label_set_chance": 0.5,
             **({"zo_extraction_flat_clients": 0.0} if method == "fzoos" else {})}]  # extraction: fzoos only
    text = " ".join([*threat_model(info), *run_notes(info, rows), attack_reading(info, rows)])
    if method != "fzoos":
        assert "RFF" not in text and "surrogate" not in text, text
    if safeguard == "off":
        assert "safeguard values" not in text and "f_i(x_{r+1})" not in text, text


def test_the_label_set_switch_names_both_sources() -> None:
    from fedsim.zo.spec import ZOAttacks

    text = ZOAttacks.model_fields["label_set"].description
    assert "grad mu_i" in text and "local step" in text


# ------------------------- QA2 kind: a mean says what it averages; a missing F says why it is missing

def test_attack_table_says_how_many_clients_and_rounds_a_mean_is_over() -> None:
    from fedsim.zo.report import attack_cells

    rows = [{"round": 1, "zo_attacked_clients": 5.0, "zo_extraction_flat_clients": 2.0, "zo_extraction_r2_mean": 0.5},
            {"round": 2, "zo_attacked_clients": 5.0, "zo_extraction_flat_clients": 0.0,
             "zo_extraction_r2_mean": None},
            {"round": 3, "zo_attacked_clients": 5.0, "zo_extraction_flat_clients": 0.0, "zo_extraction_r2_mean": 0.7}]
    head, body = attack_cells(rows)
    col = head.index("extraction R\u00b2 (fit box)")
    assert body[0][1] == "5 (R\u00b2 over 3: 2 flat f_i)" and body[2][1] == "5"
    assert body[-1][0] == "mean of 3 rounds"
    assert body[-1][col] == "0.600 (2 of 3 rounds)"  # (0.5 + 0.7) / 2, the round without a value left out


@pytest.mark.parametrize(("raw", "text"), [(None, "not recorded"), (float("nan"), "not finite"),
                                           ("abc", "not a number"), (float("inf"), "inf (not finite)"),
                                           ("inf", "inf (not finite)")])
def test_a_missing_objective_says_why(raw: object, text: str) -> None:
    from fedsim.zo.report import RunInfo, objective_line

    line = objective_line(RunInfo(), [{"round": 0, "zo_objective": 1.0, "zo_queries": 5},
                                      {"round": 1, "zo_objective": raw, "zo_queries": None}])
    assert f"-> {text}" in line or f"-> \u2014 ({text})" in line
    assert line.endswith("(queries not recorded).")
