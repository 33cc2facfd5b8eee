"""Shared fixtures: tiny scenarios that run in seconds on the in-process backend."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Two cores, shared with Ray workers: one torch thread avoids oversubscription stalls in tests.
torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 7,
    "device": "cpu",
    "data": {"dataset": "digits", "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 2},
    "federation": {"clients": 4, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 4, "lr": 0.5}},
    "backend": {"kind": "inprocess"},
    "attacks": [
        {"name": "inverting_gradients", "rounds": [1], "clients": [1], "budget": {"iterations": 5}},
    ],
}


@pytest.fixture
def tiny_raw() -> dict[str, Any]:
    return copy.deepcopy(TINY)


@pytest.fixture(autouse=True)
def _process_state_per_test(request):
    """Every test starts from the same global torch RNG state (seeded from its own id, so its draws
    do not depend on which tests ran before it, in any order), and must leave torch's thread count
    as it found it: a leaked count changes the float summation order, hence the numbers, of every
    later test (``fedsim.isolation.torch_threads`` sets one for a block)."""
    from fedsim.seeding import derive_seed

    torch.manual_seed(derive_seed(0, "test", request.node.nodeid))
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        leaked = torch.get_num_threads()
        torch.set_num_threads(threads)
        pytest.fail(f"{request.node.nodeid} left torch at {leaked} threads (it found {threads})")
