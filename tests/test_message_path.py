"""The in-process message path's shortcuts change no number (issue 17 item 6).

* a client module reused between rounds trains exactly as a freshly built one, and what a client sent is not
  changed by the next client's training (the reused module's weights must not leak into an earlier reply);
* per-round epsilon from the cached RDP curve equals Opacus's own accountant asked afresh each round, and the
  curve is computed once per (sigma, q), not once per round;
* fedsim's torch seeding leaves the generator exactly as ``torch.manual_seed`` does, without its lazy-CUDA stack
  capture on a machine with no accelerator.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch

from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.client_round import run_client_round
from fedsim.simulation.setup import FederationSetup, setup_for


def _scenario(defenses: list | None = None):
    return parse_scenario({
        "name": "message-path", "seed": 4, "device": "cpu",
        "data": {"dataset": "mnist-5k", "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 4},
        "federation": {"clients": 40, "clients_per_round": 3, "rounds": 2, "protocol": "fedavg",
                       "local": {"epochs": 1, "batch_size": 16, "lr": 0.1}},
        "evaluation": {"every": 2},
        "backend": {"kind": "inprocess"}, "defenses": defenses or [],
        "attacks": [{"name": "inverting_gradients", "rounds": [1, 2], "clients": list(range(40)),
                     "budget": {"iterations": 1, "restarts": 1}}],
    })


def test_reused_client_module_trains_like_a_fresh_one() -> None:
    sc = _scenario()
    setup = setup_for(sc)
    assert setup.client_model_reusable
    start = {k: v.clone() for k, v in setup.build_model().state_dict().items()}
    reused = [run_client_round(sc, pid, 1, start, {}, record=True) for pid in (0, 1, 2)]
    first_sent = {k: v.clone() for k, v in reused[0].sent.items()}
    setup.__dict__["client_model_reusable"] = False  # a cached_property: overridden on this instance
    try:
        fresh = [run_client_round(sc, pid, 1, start, {}, record=True) for pid in (0, 1, 2)]
    finally:
        setup.__dict__.pop("client_model_reusable")
    for a, b in zip(reused, fresh, strict=True):
        assert a.metrics == b.metrics and a.num_examples == b.num_examples
        assert all(torch.equal(a.sent[k], b.sent[k]) for k in b.sent)
        assert all(torch.equal(a.truth[k], b.truth[k]) for k in b.truth)
    # client 0's reply is still what it sent, after clients 1 and 2 trained the same module
    assert all(torch.equal(reused[0].sent[k], first_sent[k]) for k in first_sent)


@pytest.mark.slow  # two federations: ~5 s idle, more on a shared CPU
def test_whole_run_identical_with_and_without_module_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    def outcome(reuse: bool):
        sc = _scenario([{"name": "central_dp", "params": {"noise_multiplier": 0.3}}])
        monkeypatch.setattr(FederationSetup, "client_model_reusable", property(lambda self: reuse))
        return run_federation(sc)

    a, b = outcome(True), outcome(False)
    def rows(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert rows(a.history) == rows(b.history)
    assert len(a.capture.updates) == len(b.capture.updates) == 6
    for u, v in zip(a.capture.updates, b.capture.updates, strict=True):
        assert (u.round, u.partition_id) == (v.round, v.partition_id)
        assert all(torch.equal(u.update[k], v.update[k]) for k in v.update)
        assert torch.equal(u.truth.inputs, v.truth.inputs) and torch.equal(u.truth.labels, v.truth.labels)
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in b.final_state)


def test_central_dp_epsilon_per_round_equals_opacus_and_curve_is_computed_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp

    from fedsim.defenses import build_defenses
    from fedsim.privacy import accounting

    sigma, q, rounds = 0.87, 0.075, 8
    sc = parse_scenario({
        "name": "eps", "seed": 0, "device": "cpu", "data": {"dataset": "mnist-5k"}, "model": {"name": "convnet"},
        "federation": {"clients": 40, "clients_per_round": 3, "rounds": rounds, "protocol": "fedavg"},
        "defenses": [{"name": "central_dp", "params": {"noise_multiplier": sigma}}]})
    (dp,) = build_defenses(sc)
    accounting._opacus.cache_clear()
    accounting._rdp_per_step.cache_clear()
    calls = []
    real = rdp._compute_rdp
    monkeypatch.setattr(rdp, "_compute_rdp", lambda *a: calls.append(a) or real(*a))
    got = [dp.server_round_metrics(r)["epsilon"] for r in range(1, rounds + 1)]
    assert len(calls) == len(create_accountant("rdp").DEFAULT_ALPHAS)  # one curve, not one per round
    monkeypatch.setattr(rdp, "_compute_rdp", real)
    for r, eps in enumerate(got, start=1):
        acc = create_accountant("rdp")
        acc.history = [(sigma, q, r)]
        assert eps == float(acc.get_epsilon(1e-5))  # bit for bit, what the old per-round call returned


def test_seed_torch_is_manual_seed_without_the_lazy_cuda_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsim.seeding import seed_torch

    torch.manual_seed(1234)
    want = torch.get_rng_state()
    torch.manual_seed(1)
    seed_torch(1234)
    assert torch.equal(torch.get_rng_state(), want)
    if torch.cuda.is_available():
        return
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: pytest.fail("seeding captured a stack"))
    seed_torch(99)


def test_core_seeds_torch_through_seed_torch() -> None:
    """torch.manual_seed costs a formatted stack trace per call without a GPU (several per client per round)."""
    root = Path(__file__).resolve().parents[1] / "fedsim"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "seeding.py"
                 and re.search(r"^\s*torch\.manual_seed\(", p.read_text(), re.M)]
    assert offenders == []
