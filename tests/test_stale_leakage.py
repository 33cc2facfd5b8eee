"""What ``gi_conversion``'s outputs claim about the privacy price of the repair (issue 13, QA findings 1-4).

Kinds guarded here: (1) the leakage of the server's estimates is judged against the BEST blind guess, scored by the
same function (an all-black image beats a flat 0.5 gray on MNIST-like data; the server's own un-optimised start is
a blind guess too); (2) a failed inversion (non-finite loss) is counted, never scored, never mixed in; (3) the
switch round is the one the server used (``gi.switch_round`` / detector), recorded, not inferred from later rows,
and a switch before the first inversion says the run was plain ``direct``. Expected values are hand arithmetic on
hand-made images.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_stale_gi import arrival_for, gi_raw

import fedsim.simulation.stale_gi as stale_gi
from fedsim.report.stale_gi import stale_gi_section, summary_line
from fedsim.scenario import parse_scenario
from fedsim.simulation.stale_gi import EstimateRecord, gi_conversion
from fedsim.simulation.stale_leakage import round_metrics, score_estimate


def mnist_like() -> torch.Tensor:
    """4 black 4x4 images with one white pixel each (a 'stroke' on a black background)."""
    truth = torch.zeros(4, 1, 4, 4)
    for i in range(4):
        truth[i, 0, i, i] = 1.0
    return truth


def record(pixels: torch.Tensor, loss: float = 0.0, initial: torch.Tensor | None = None) -> EstimateRecord:
    soft = F.one_hot(torch.tensor([2] * len(pixels)), 10).float()
    extra = {} if initial is None else {"initial": initial}
    return EstimateRecord(round=3, partition_id=1, tau=2, lam=1.0, pixels=pixels, soft_labels=soft, loss=loss,
                          iterations=1, seconds=0.0, warm=False, **extra)


def test_an_all_black_estimate_has_no_margin_over_the_best_blind_guess() -> None:
    truth, labels = mnist_like(), torch.tensor([2, 2, 2, 2])
    score = score_estimate(record(torch.zeros(2, 1, 4, 4)), truth, labels)
    black = 10 * math.log10(16)  # one wrong pixel of 16: MSE 1/16
    assert math.isclose(score["psnr"], black, abs_tol=1e-6)
    assert math.isclose(score["psnr_trivial"], black, abs_tol=1e-6)  # black is one of the blind guesses
    assert score["psnr_margin"] == pytest.approx(0.0, abs=1e-9)  # the old 0.5-gray baseline said +6 dB
    # an exact copy of two strokes: a margin, by PSNR and by one-to-one matched SSIM
    copy = score_estimate(record(truth[:2].clone()), truth, labels)
    assert copy["psnr_margin"] > 50 and copy["ssim_matched"] == pytest.approx(1.0)
    assert copy["ssim_matched_margin"] > 0.2
    # labels: all estimates say class 2 like the client; the best blind label guess (uniform over 10) scores 0.1
    assert copy["label_acc"] == 1.0 and math.isclose(copy["label_trivial"], 0.1)


def test_the_servers_own_start_is_a_blind_guess() -> None:
    truth = mnist_like()
    start = torch.zeros(2, 1, 4, 4)
    start[:, 0, 0, 0] = 1.0  # the start happens to match truth[0] exactly
    estimate = torch.full((2, 1, 4, 4), 0.02)  # close to black, worse than the start
    score = score_estimate(record(estimate, initial=start), truth, torch.tensor([2, 2, 2, 2]))
    assert score["psnr_trivial"] == 100.0 and score["psnr_margin"] < 0


def test_a_failed_inversion_is_counted_not_scored() -> None:
    truth = mnist_like()
    rows = round_metrics([record(torch.zeros(2, 1, 4, 4), loss=float("nan"))],
                         lambda pid: (truth, torch.tensor([2, 2, 2, 2])))
    assert rows["gi_inversions"] == 1 and rows["gi_failed"] == 1
    assert not any(k.startswith(("gi_psnr", "gi_ssim", "gi_label")) for k in rows)
    line = summary_line([{"round": 3, **rows}])
    assert "FAILED" in line and "privacy price" not in line.split("FAILED")[0]


def test_a_failed_inversion_is_not_mixed_in(tiny_raw, monkeypatch) -> None:
    scenario = parse_scenario(gi_raw(tiny_raw))
    arrival = arrival_for(scenario)

    def diverged(arrival, scenario, model, steps, task):  # noqa: ANN001, ANN202
        x = torch.full((4, *task.input_shape), float("nan"))
        return x, torch.zeros(4, task.num_classes), float("nan"), False

    monkeypatch.setattr(stale_gi, "invert", diverged)
    out = gi_conversion(arrival, scenario)
    direct = {k: arrival.current[k] + (v - arrival.base[k]) for k, v in arrival.local.items() if v.is_floating_point()}
    assert all(torch.allclose(out[k], direct[k]) for k in direct)  # the stale update as it came
    assert arrival.memory["estimate_record"].failed and "estimate" not in arrival.memory  # no warm start from NaN


def _run(tiny_raw, tmp_path, gi):  # noqa: ANN001, ANN202
    from fedsim.run import run_scenario

    run_scenario(parse_scenario(gi_raw(tiny_raw, gi)), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["utility"]
    return (rows, (tmp_path / "run" / "summary.md").read_text(), (tmp_path / "run" / "report.html").read_text())


def test_the_configured_switch_round_is_recorded_not_inferred(tiny_raw, tmp_path) -> None:
    # client 1 is stale in rounds 3 and 5; gi.switch_round = 4: inverted in 3, not in 5. The old report said 5.
    rows, summary, page = _run(tiny_raw, tmp_path, {"switch_round": 4})
    by_round = {int(r["round"]): r for r in rows}
    assert by_round[3]["gi_inversions"] == 1 and by_round[5].get("gi_switch_round") == 4
    assert by_round[5].get("gi_uninverted") == 1
    assert "at round 4" in summary and "round 5" not in summary
    assert "round 4 (lambda_t" in page


def test_a_switch_before_the_first_inversion_says_the_run_was_direct(tiny_raw, tmp_path) -> None:
    rows, summary, page = _run(tiny_raw, tmp_path, {"switch_round": 1})
    assert not any(r.get("gi_inversions") for r in rows)
    assert "No inversion ran" in summary and "`direct`" in summary
    assert 'id="stale-gi"' in page and "no inversion ran" in page


def test_the_section_labels_the_evaluated_class_not_a_slow_class() -> None:
    rows = [{"round": 3, "gi_inversions": 1, "gi_failed": 0, "gi_seconds": 1.0, "test_accuracy_class7": 0.5}]
    page = stale_gi_section(rows)
    assert "class-7 acc %" in page and "slow-class" not in page


def test_the_summary_says_when_no_client_was_ever_stale(tiny_raw, tmp_path) -> None:
    from fedsim.run import run_scenario

    raw = gi_raw(tiny_raw)
    # client 2 trains only in round 2 of 3 (round-robin 0,1 | 2,3 | 0,1), before its lag of 2 exists
    raw["federation"].update(rounds=3)
    raw["federation"]["staleness"].update(slow_clients=[2], aggregation="direct", gi=None)
    del raw["federation"]["staleness"]["gi"]
    run_scenario(parse_scenario(raw), tmp_path / "run")
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "no client was ever stale" in summary


def test_set_with_a_bracketed_list_index_names_the_dotted_syntax() -> None:
    from fedsim.errors import ScenarioError
    from fedsim.yaml_input import apply_overrides

    with pytest.raises(ScenarioError) as err:
        apply_overrides({"attacks": [{"rounds": [1]}]}, ["attacks[0].rounds=[6]"])
    assert "'attacks.0.rounds'" in str(err.value)  # was "attacks[0]: unknown field" later, at validation
