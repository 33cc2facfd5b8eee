"""The privacy lines of summary.md / report.html name the method that ran and say what the curious server sees.

* DP-SAT and DP-SAM runs were labelled "DP-SGD (sample-level)": each sample-level optimizer is now named, DP-SAM
  with its accounting (two queries on one Poisson batch = one subsampled Gaussian of sigma / sqrt 2 per step);
* DIFF2 with central noise under SecAgg+ said the server "sees every client's un-noised message": it sees the
  un-noised AGGREGATE (epsilon against it still inf); local shares under SecAgg+ reach the server only summed, so
  its epsilon is the released one, not the per-message one.
"""

from __future__ import annotations

import copy
import math

import pytest
from diff2_support import run, scenario_raw

from fedsim.privacy.summary import privacy_summary
from fedsim.report.privacy import privacy_lines
from fedsim.simulation import run_federation

SAMPLE_DP = {"dp_sgd": "DP-SGD (sample-level)", "dp_sat": "DP-SAT (sample-level", "dp_sam": "DP-SAM (sample-level"}


@pytest.mark.parametrize("method", list(SAMPLE_DP))
def test_sample_level_lines_name_the_optimizer_that_ran(tiny_raw, method: str) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["attacks"], raw["federation"]["rounds"] = [], 1
    params = {"noise_multiplier": 1.0, **({"persist": True} if method == "dp_sat" else {})}  # fedsgd: one step
    raw["defenses"] = [{"name": method, "params": params}]
    from fedsim.scenario import parse_scenario

    outcome = run_federation(parse_scenario(raw))
    block = privacy_summary(outcome.history, outcome.capture.client_metrics)
    assert block["dp_sgd"]["method"] == method
    first = privacy_lines(block)[0]
    assert first.startswith(SAMPLE_DP[method])
    others = [name.split(" ")[0] for m, name in SAMPLE_DP.items() if m != method]
    assert not any(first.startswith(o) for o in others)
    if method == "dp_sam":
        assert "sigma / sqrt(2) per step" in first and "one Poisson batch" in first


PARAMS = {"restart_period": 2, "target_epsilon": 3}


@pytest.mark.parametrize(("placement", "secure"), [("central", False), ("central", True), ("local", False),
                                                   ("local", True), ("distributed", True)])
def test_diff2_against_server_note_follows_placement_and_secagg(placement: str, secure: bool) -> None:
    outcome = run(scenario_raw({**PARAMS, "noise_placement": placement}, rounds=2, secure=secure))
    block = privacy_summary(outcome.history, outcome.capture.client_metrics)["diff2"]
    note = block["against_server_note"]
    assert block["secure_aggregation"] is secure
    if placement == "central":
        assert math.isinf(block["epsilon_vs_server"])
        assert ("every client's un-noised message" in note) is not secure
        assert ("un-noised aggregate" in note) is secure
    elif secure:  # the server sees only the aggregate, which carries the whole released noise
        assert block["epsilon_vs_server"] == block["epsilon"] and "aggregate" in note
    else:  # each client's own noised message: a weaker guarantee than the released one
        assert block["epsilon_vs_server"] > block["epsilon"] and "own noised message" in note
    assert note in "\n".join(privacy_lines({"diff2": block}))
