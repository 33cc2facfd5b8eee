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
