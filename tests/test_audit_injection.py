"""The audit's canaries inside the real federation (fedsim.audit.inject): the released model moves by exactly the
canaries' contribution, recomputed here by brute force from the canary directions and the seeded draws.

Each test runs one scenario twice, without and with ``audit:`` (noise 0, one round, one step, so the model is
linear in what the canaries add), and compares ``final(audit) - final(no audit)`` over the trainable parameters
with the closed form of its path. The draws are re-derived from the seed labels the canary set documents
(coins: ``(seed, "audit", "coins")``; a batch's example canaries: ``(seed, "audit", "sample", round, pid, step)``;
the round's client canaries: ``(seed, "audit", "clients", round)``), the directions from ``CanarySet.direction``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from fedsim.audit.canaries import CanarySet, canaries_for
from fedsim.scenario import parse_scenario
from fedsim.seeding import numpy_rng, torch_generator
from fedsim.simulation import run_federation

SEED, M, P, N_P, LR = 5, 40, 4, 20, 0.5  # 4 clients x 20 digits; 40 canaries (10 per client at the example level)
SECAGG = {"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}
BASE: dict[str, Any] = {
    "name": "audit-inject", "seed": SEED, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": P * N_P, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": P, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 10, "lr": LR}},
    "backend": {"kind": "inprocess"}, "evaluation": {"every": 100}, "attacks": [],
}


def raw_with(defenses: list[dict], protocol: str = "fedsgd", **local: Any) -> dict:
    raw = copy.deepcopy(BASE)
    raw["defenses"] = defenses
    raw["federation"]["protocol"] = protocol
    raw["federation"]["local"].update(local)
    return raw


def moved(raw: dict, audit: dict) -> tuple[torch.Tensor, CanarySet]:
    """``final(audit) - final(no audit)`` over the trainable parameters (flat, named_parameters order), and the
    audited run's canaries."""
    plain = run_federation(parse_scenario(raw)).final_state
    audited_raw = {**copy.deepcopy(raw), "audit": {"canaries": M, **audit}}
    scenario = parse_scenario(audited_raw)
    audited = run_federation(scenario).final_state
    canaries = canaries_for(scenario)
    assert canaries is not None
    return torch.cat([(audited[k] - plain[k]).reshape(-1).float() for k in canaries.names]), canaries


def coins() -> np.ndarray:
    return numpy_rng(SEED, "audit", "coins").random(M) < 0.5


def check(change: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.norm() > 1e-3  # some canary was drawn in: the test can fail
    torch.testing.assert_close(change, expected, atol=2e-6, rtol=0)


# -- example canaries, Opacus DP-SGD family ----------------------------------------------------------------------
def example_sum(canaries: CanarySet, q: float, norm: float) -> torch.Tensor:
    """mean over clients of ``C sum c_j`` over each client's included canaries drawn into its batch 0 of round 1."""
    inside = coins()
    total = torch.zeros(canaries.dim)
    for pid in range(P):
        mine = list(range(pid, M, P))  # canary j belongs to client j mod P
        drawn = numpy_rng(SEED, "audit", "sample", 1, pid, 0).random(len(mine)) < q
        for j, d in zip(mine, drawn, strict=True):
            if d and inside[j]:
                total += norm * canaries.direction(j)
    return total / P


DPSGD_CASES = [  # (defense, params, protocol, local)
    ("dp_sgd", {"grad_sample_mode": "hooks"}, "fedsgd", {}),
    ("dp_sgd", {"grad_sample_mode": "functorch"}, "fedsgd", {}),
    ("dp_sgd", {"grad_sample_mode": "ew"}, "fedavg", {"steps": 1}),
    ("dp_sgd", {"grad_sample_mode": "ghost"}, "fedsgd", {}),
    ("dp_sgd", {"grad_sample_mode": "hooks", "poisson": False}, "fedavg", {"steps": 1}),
    ("dp_sat", {"rho": 0.05}, "fedavg", {"steps": 1}),  # the round's first step is unperturbed
    ("dp_sam", {"rho": 0.0, "grad_sample_mode": "ghost"}, "fedsgd", {}),  # two queries, the descent one is sent
]


@pytest.mark.parametrize(("name", "params", "protocol", "local"), DPSGD_CASES)
def test_example_canaries_join_the_clipped_sum_before_the_noise(name, params, protocol, local) -> None:
    """One step of batch size 10 (q = 1/2), C = 0.7, sigma 0: each client's gradient gains C sum c_j / 10 over its
    included canaries drawn into the batch, so the model moves by -lr x the mean over the (equally weighted)
    clients; fedavg with one local SGD step moves the same."""
    raw = raw_with([{"name": name, "params": {"noise_multiplier": 0.0, "max_grad_norm": 0.7, **params}}],
                   protocol, **local)
    change, canaries = moved(raw, {"level": "example"})
    check(change, -LR * example_sum(canaries, 0.5, 0.7) / 10)


@pytest.mark.parametrize("name", ["dp_sgd", "dp_sam"])
def test_every_batch_is_a_step_and_dp_sams_two_queries_share_its_draw(monkeypatch, name) -> None:
    """fedavg, 3 Poisson batches at q = 1/20 (some empty): every client asks the canaries of steps 0, 1, 2 once per
    private query, in order (DP-SAM: twice per batch, the same step), including the empty batches."""
    from fedsim.defenses.dp_sgd import poisson_batches

    calls: list[tuple[int, int, int]] = []
    original = CanarySet.example_drawn

    def spy(self, pid, server_round, step, q):  # noqa: ANN001, ANN202
        calls.append((pid, server_round, step))
        assert q == 1 / N_P
        return original(self, pid, server_round, step, q)

    monkeypatch.setattr(CanarySet, "example_drawn", spy)
    raw = raw_with([{"name": name, "params": {"noise_multiplier": 0.5, "max_grad_norm": 0.7}}], "fedavg",
                   batch_size=1, steps=3)
    run_federation(parse_scenario({**raw, "audit": {"canaries": M}}))
    queries = 2 if name == "dp_sam" else 1
    for pid in range(P):
        assert [s for p, r, s in calls if p == pid and r == 1] == [s for s in range(3) for _ in range(queries)]
    sizes = [len(b) for pid in range(P) for b in poisson_batches(N_P, 1 / N_P, 3, torch_generator(
        SEED, "batches", 1, pid))]
    assert 0 in sizes  # an empty batch was among the steps counted


# -- example canaries, DIFF2 (replace-one) ------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "secure"), [
    ({"c1": 0.8, "noise_placement": "central"}, False),
    ({"c1": None}, False),  # no clipping (zero noise only): the canaries have norm 1
    ({"c1": 0.8, "noise_placement": "local"}, False),
    ({"c1": 0.8, "noise_placement": "distributed"}, True),  # SecAgg+'s weighted mean (equal partitions)
])
def test_diff2_restart_messages_carry_every_canary_signed(params, secure) -> None:
    """A restart round (T = 1), sigma1 0: client p's a_p gains sum_j s_j C1 c_j / n_p over ALL its canaries
    (s_j = +1 included, -1 left out), and the server steps -lr x the mean over clients."""
    defenses = [{"name": "diff2", "params": {"restart_period": 1, "sigma1": 0.0, **params}}]
    change, canaries = moved(raw_with(defenses + ([SECAGG] if secure else [])), {})
    assert canaries.level == "example"
    norm = 1.0 if params["c1"] is None else params["c1"]
    inside = coins()
    expected = torch.zeros(canaries.dim)
    for j in range(M):
        expected += (norm if inside[j] else -norm) * canaries.direction(j) / N_P
    check(change, -LR * expected / P)


def test_diff2_difference_rounds_add_no_canary(monkeypatch) -> None:
    """T = 2 over 2 rounds: only round 1 (the restart) asks for the canaries' shift, once per client."""
    from fedsim.defenses.diff2_client import Diff2ClientRound

    rounds: list[int] = []
    original = Diff2ClientRound.canary_rows

    def spy(self):  # noqa: ANN001, ANN202
        rounds.append(self.job.round)
        return original(self)

    monkeypatch.setattr(Diff2ClientRound, "canary_rows", spy)
    raw = raw_with([{"name": "diff2", "params": {"restart_period": 2, "sigma1": 0.0, "sigma2": 0.0}}])
    raw["federation"]["rounds"] = 2
    run_federation(parse_scenario({**raw, "audit": {"canaries": M}}))
    assert rounds == [1] * P


# -- client canaries ----------------------------------------------------------------------------------------------
def client_sum(canaries: CanarySet, k: int, norm: float) -> torch.Tensor:
    """``(C / K) sum c_j`` over the included canaries taking part in round 1 (rate K / N)."""
    part = numpy_rng(SEED, "audit", "clients", 1).random(M) < k / P
    inside = coins()
    total = torch.zeros(canaries.dim)
    for j in range(M):
        if part[j] and inside[j]:
            total += canaries.direction(j)
    return total * norm / k


# Central DP and the plain path without DP: the canaries are client replies through the server's clipping and
# weighting, tested in tests/test_audit_client_canaries.py. Under SecAgg+ they join the unmasked aggregate.
@pytest.mark.parametrize(("protocol", "norm"), [("fedsgd", 0.3), ("fedsgd", None), ("fedavg", 0.3)])
def test_client_canaries_join_the_unmasked_aggregate_under_secagg(protocol, norm) -> None:
    """SecAgg+ (no client-level DP there): C = audit.client_norm (default 1.0); fedsgd steps -lr (C / K) sum c_j,
    fedavg moves +(C / K) sum c_j."""
    raw = raw_with([SECAGG], protocol, **({"steps": 1} if protocol == "fedavg" else {}))
    change, canaries = moved(raw, {} if norm is None else {"client_norm": norm})
    expected = client_sum(canaries, P, 1.0 if norm is None else norm)
    check(change, -LR * expected if protocol == "fedsgd" else expected)


# ~28 s: the canaries' draws are seeded by (seed, round, client, step); backend equality: tests/test_ray_backend.py
@pytest.mark.slow
@pytest.mark.ray
def test_audited_runs_give_identical_models_in_process_and_on_ray() -> None:
    """Example canaries drawn in Ray's client actors and client-side noise: the same final model as in-process."""
    raw = raw_with([{"name": "dp_sgd", "params": {"noise_multiplier": 0.8, "max_grad_norm": 0.7}}], "fedavg",
                   steps=2)
    scenario = parse_scenario({**raw, "audit": {"canaries": M}})
    local = run_federation(scenario, backend="inprocess").final_state
    ray = run_federation(scenario, backend="ray").final_state
    plain = run_federation(parse_scenario(raw), backend="inprocess").final_state
    assert all(torch.equal(local[k], ray[k]) for k in local)
    assert any(not torch.equal(local[k], plain[k]) for k in local)  # the canaries moved the model
