"""Real Ray: Flower's simulation engine gives exactly the in-process numbers (about 20 s)."""

from __future__ import annotations

import pytest
import torch

from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation

pytestmark = pytest.mark.ray


def test_ray_and_inprocess_give_identical_rounds_and_updates(tiny_raw) -> None:
    tiny_raw["federation"]["rounds"] = 3
    tiny_raw["attacks"][0].update(rounds=[2], clients=[0, 3])
    scenario = parse_scenario(tiny_raw)
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")

    def rows(outcome):
        return [(h["round"], h.get("test_loss"), h.get("test_accuracy"), h.get("train_loss")) for h in outcome.history]

    assert rows(ray) == rows(local)
    assert [(u.round, u.partition_id) for u in ray.capture.updates] == [(2, 0), (2, 3)]
    for a, b in zip(local.capture.updates, ray.capture.updates, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
        assert torch.equal(a.truth.inputs, b.truth.inputs)
    assert all(torch.equal(local.final_state[k], ray.final_state[k]) for k in local.final_state)


@pytest.mark.slow  # tests/test_secagg_pipeline.py checks the same and more on Ray in the default run
def test_secure_aggregation_runs_on_ray_like_inprocess(tiny_raw) -> None:
    tiny_raw["defenses"] = [{"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}]
    scenario = parse_scenario(tiny_raw)
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")
    assert [h["test_accuracy"] for h in ray.history] == [h["test_accuracy"] for h in local.history]
    (a,), (b,) = local.capture.updates, ray.capture.updates
    assert a.partition_id == b.partition_id == -1
    assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
