"""A client-side check refusing the model in every sampled client is the defense working, not a crash.

The round aggregates nothing, the global model stays as it was, later rounds run, and metrics.json, summary.md and
report.html are all written (:mod:`fedsim.simulation.participation`), on the plain path and under SecAgg+. The
manipulation here is a test-only plug-in (it scales the first weight matrix), so any statistics check refuses it;
the expected global model is the agreed model built directly, not read from the federation.
"""

from __future__ import annotations

import copy
import json
from typing import ClassVar

import pytest
import torch

from fedsim.attacks import ATTACKS
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.threat import ManipulationView, Reconstruction, ServerModel

SCALE = 10.0


class _ScaleAll(MaliciousAttack):
    """Scales the first weight matrix of the model it sends (a weights-only manipulation)."""

    threat_model: ClassVar[str] = "F"
    matches_differences: ClassVar[bool] = True

    def manipulate(self, view: ManipulationView) -> ServerModel:
        name = next(k for k, v in view.global_state.items() if v.dim() == 2)
        return ServerModel({k: (v * SCALE if k == name else v) for k, v in view.global_state.items()}, note="scaled")

    def reconstruct(self, update, progress=None) -> Reconstruction:  # noqa: ANN001
        return Reconstruction.failure("test attack: reconstruction not tested here")


@pytest.fixture(autouse=True)
def _plugin():
    ATTACKS.add("test_refusal_scale", _ScaleAll)
    yield
    ATTACKS._items.pop("test_refusal_scale", None)


def _raw(tiny_raw: dict, secagg: bool, rounds: int) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["server"] = {"role": "malicious"}
    raw["federation"]["rounds"] = rounds
    raw["attacks"] = [{"name": "test_refusal_scale", "rounds": [1], "clients": "all",
                       "knowledge": {"local_hparams": True}}]
    raw["defenses"] = [{"name": "model_check", "params": {"action": "refuse"}}]
    if secagg:
        raw["defenses"].append({"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}})
    return raw


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_every_client_refusing_keeps_the_global_model(tiny_raw, secagg) -> None:
    scenario = parse_scenario(_raw(tiny_raw, secagg, rounds=1))
    agreed = setup_for(scenario).build_model().state_dict()  # the initial model, built here
    outcome = run_federation(scenario)
    row = next(h for h in outcome.history if h["round"] == 1)
    assert (row["clients_requested"], row["clients_aggregated"], row["clients_refused"]) == (4, 0, 4)
    assert outcome.final_state is not None and set(outcome.final_state) == set(agreed)
    for k, v in agreed.items():  # the malicious server learned nothing: the model did not move
        assert torch.equal(outcome.final_state[k], v), k


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_a_refused_round_writes_every_output_and_later_rounds_run(tiny_raw, tmp_path, secagg) -> None:
    from fedsim.run import run_scenario

    result = run_scenario(parse_scenario(_raw(tiny_raw, secagg, rounds=2)), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = {h["round"]: h for h in metrics["utility"]}
    assert rows[1]["clients_aggregated"] == 0 and rows[1]["clients_refused"] == 4
    assert rows[2]["clients_aggregated"] == 4 and "clients_refused" not in rows[2]
    assert len(metrics["client_failures"]) == 4
    assert all("ModelRefusedError" in f["reason"] for f in metrics["client_failures"])
    assert result.outcomes  # one per client (plain) or the aggregate (SecAgg+): each failed with the refusal
    assert all(o.failed and "ModelRefusedError" in o.failed for o in result.outcomes)
    summary = (tmp_path / "run" / "summary.md").read_text()
    report = (tmp_path / "run" / "report.html").read_text()
    for text in (summary, report):
        assert "every client refused the server" in text and "ModelRefusedError" in text


def test_a_round_with_other_failures_still_stops(tiny_raw, monkeypatch) -> None:
    """Only refusals are a deliberate outcome: a round where every client crashed still raises NoProgressError."""
    from fedsim.errors import NoProgressError
    from fedsim.simulation.participation import Participation

    p = Participation()
    p.requested[1], p.aggregated[1] = 2, 0
    p.fail(1, 0, "ModelRefusedError: model_check: abnormal weights")
    p.fail(1, 1, "RuntimeError: out of memory")
    with pytest.raises(NoProgressError, match="round 1"):
        p.check(1)
    p.requested[2], p.aggregated[2] = 1, 0
    p.fail(2, 0, "ModelRefusedError: model_check: abnormal weights")
    p.check(2)  # every client refused: the run goes on
    assert p.row(2) == {"clients_requested": 1, "clients_aggregated": 0, "clients_failed": 1, "clients_refused": 1}


def test_a_not_attacked_target_is_an_ok_cell_never_a_failed_one(tiny_raw, tmp_path) -> None:
    """QA finding 3: a target client that was not sampled ("not attacked", fedsim.outcomes) must count as not
    attacked in every reader of outcomes (report cells, leaderboard, leakage curve), with the run's test accuracy."""
    from fedsim.outcomes import was_not_attacked
    from fedsim.report.leakage import leakage_curve
    from fedsim.report.loading import load_run
    from fedsim.report.tables import leaderboard
    from fedsim.run import run_scenario

    raw = copy.deepcopy(tiny_raw)
    raw["federation"].update(rounds=1, clients_per_round=1)
    raw["attacks"] = [{"name": "inverting_gradients", "rounds": [1], "clients": [0, 1, 2, 3],
                      "budget": {"iterations": 1}}]
    out = tmp_path / "run"
    result = run_scenario(parse_scenario(raw), out)
    skipped = [o for o in result.outcomes if was_not_attacked(o.failed)]
    assert len(skipped) == 3  # one of 4 clients sampled
    (curve_row,) = leakage_curve(result.outcomes)
    assert curve_row["failed"] == 0 and curve_row["not_attacked"] == 3
    # keep only the not-attacked outcomes: the run's one attack then has no update at all
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["attacks"] = [o for o in metrics["attacks"] if was_not_attacked(o.get("failed"))]
    (out / "metrics.json").write_text(json.dumps(metrics))
    (cell,) = load_run(out).cells
    assert cell.ok and cell.error is None
    (row,) = leaderboard([cell])
    assert (row.ok, row.failed, row.attacks_failed, row.not_attacked) == (1, 0, 0, 3)
    want = [h for h in metrics["utility"] if "test_accuracy" in h][-1]["test_accuracy"]
    assert cell.summary["test_accuracy"] == want


def _check(**params):  # noqa: ANN003, ANN202
    from fedsim.defenses.model_check import ModelCheck, ModelCheckParams

    return ModelCheck(ModelCheckParams(**params), "model_check")


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(37, 13), torch.nn.ReLU(), torch.nn.Linear(13, 5))


def test_model_check_gives_one_model_one_verdict(tiny_raw) -> None:
    """QA finding 4: client A accepted the agreed model in round 1 (so it holds a stored reference); client B is
    first sampled in round 2. Both compare the same round-2 model with the same (initial) statistics, so their
    numbers and verdict must be identical - the stored reference must not be rounded to float32."""
    from fedsim.defenses.base import UpdateContext

    check = _check(action="flag")
    agreed = _mlp(0)
    state_a: dict = {}
    first = check.inspect_model(copy.deepcopy(agreed), agreed, (), UpdateContext(0, 1, 0, "fedsgd", 4, state=state_a))
    # an unchanged model: exactly no change (closed form), not 0.9999999999997827
    assert first["model_check_norm_ratio"] == 1.0 and first["model_check_mean_shift"] == 0.0
    assert first["model_check_negative_shift"] == 0.0 and first["model_check_flagged"] == 0.0
    received = _mlp(1)  # the round-2 model: another draw of the same architecture
    a = check.inspect_model(received, agreed, (), UpdateContext(0, 2, 0, "fedsgd", 4, state=state_a))
    b = check.inspect_model(received, agreed, (), UpdateContext(0, 2, 1, "fedsgd", 4, state={}))
    assert a == b



def test_a_model_check_flag_shows_in_summary_and_report(tiny_raw, tmp_path) -> None:
    """QA finding 5: model_check's flag verdict (action: flag) must be in summary.md and report.html, not only in
    metrics.json client_metrics: every client got the first weight matrix scaled x10, so every one flags it there."""
    from fedsim.run import run_scenario

    raw = _raw(tiny_raw, secagg=False, rounds=1)
    raw["defenses"] = [{"name": "model_check", "params": {"action": "flag"}}]
    scenario = parse_scenario(raw)
    state = setup_for(scenario).build_model().state_dict()
    layer = next(i for i, (k, v) in enumerate(state.items()) if v.dim() == 2)  # what _ScaleAll scales
    run_scenario(scenario, tmp_path / "run")
    summary = (tmp_path / "run" / "summary.md").read_text()
    report = (tmp_path / "run" / "report.html").read_text()
    for text in (summary, report):
        assert "flagged by client checks" in text and f"4 of 4 (model_check, layer {layer})" in text
        assert "Client-side model check" in text and "4 of 4 client-round(s) checked flagged" in text
    assert "norm_ratio 10" in summary
