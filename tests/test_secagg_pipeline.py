"""One client pipeline for both client paths: what SecAgg+ aggregates is what the plain path's clients send.

Kind guarded: two client code paths that can drift (issue 11, item 1). Before the shared pipeline the
SecAgg+ client skipped every ``transform_update`` (the aggregate under gaussian_noise sigma = 100 was
bit-identical to plain SecAgg) and kept no per-client state or metrics (no epsilon under DP-SGD).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from fedsim.defenses import DEFENSES, Defense, UpdateContext
from fedsim.scenario import DefenseSpec, parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.capture import AGGREGATE_ID

SECAGG = {"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}
# Parameters with a clearly visible effect on the tiny MLP's gradients (norm ~0.3, entries ~1e-2);
# a newly registered update-stage defense runs with its defaults and must show an effect too.
STRONG: dict[str, dict[str, Any]] = {
    "gaussian_noise": {"sigma": 0.1}, "laplace_noise": {"scale": 0.1}, "clipping": {"max_norm": 0.02},
    "pruning": {"percent": 90.0}, "quantization": {"bits": 2},
    "diff2": {"restart_period": 2, "sigma1": 0.05, "sigma2": 0.1, "noise_placement": "local"},
}
# Defenses that only transform the update a client computed; one that computes the message itself (its
# wrap_training, e.g. diff2's full-partition gradient) cannot be replayed on the undefended update: tests/test_diff2.py
UPDATE_STAGE = sorted(name for name in DEFENSES.names()
                      if DEFENSES.get(name).transform_update is not Defense.transform_update
                      and DEFENSES.get(name).wrap_training is Defense.wrap_training)


def _raw(tiny_raw: dict, defenses: list[dict], rounds: int = 1) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["federation"]["rounds"] = rounds
    raw["attacks"][0].update(clients="all", rounds=[1])
    raw["defenses"] = defenses
    return raw


def _spec(name: str) -> dict:
    return {"name": name, "params": STRONG.get(name, {})}


def _norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))


@pytest.fixture(scope="module")
def plain_runs() -> dict:
    """Plain SecAgg+'s aggregate and the undefended per-client updates of the same round (no SecAgg)."""
    from conftest import TINY

    raw = _raw(TINY, [SECAGG])
    (aggregate,) = run_federation(parse_scenario(raw)).capture.updates
    clients = run_federation(parse_scenario(_raw(TINY, []))).capture.updates
    return {"aggregate": aggregate, "clients": clients, "scenario": parse_scenario(_raw(TINY, []))}


def test_the_registry_has_update_stage_defenses() -> None:
    assert {"gaussian_noise", "laplace_noise", "clipping", "pruning", "quantization"} <= set(UPDATE_STAGE)


@pytest.mark.parametrize("name", UPDATE_STAGE)
def test_every_update_stage_defense_reaches_the_secure_aggregate(tiny_raw, plain_runs, name) -> None:
    """The aggregate equals the weighted mean of the clients' updates each transformed by the defense
    (its transform_update called here directly on the plain path's undefended updates), not plain SecAgg's."""
    (secure,) = run_federation(parse_scenario(_raw(tiny_raw, [SECAGG, _spec(name)]))).capture.updates
    assert secure.partition_id == AGGREGATE_ID
    defense = DEFENSES.get(name).from_spec(DefenseSpec(**_spec(name)), plain_runs["scenario"])
    clients = plain_runs["clients"]
    total = sum(u.num_examples for u in clients)
    expected = {k: torch.zeros_like(v) for k, v in clients[0].update.items()}
    for u in clients:
        ctx = UpdateContext(7, 1, u.partition_id, "fedsgd", u.num_examples)
        sent, _ = defense.transform_update({k: v.clone() for k, v in u.update.items()}, ctx)
        for k in expected:
            expected[k] += sent[k] * (u.num_examples / total)
    plain = plain_runs["aggregate"].update
    change = _norm({k: secure.update[k] - plain[k] for k in plain})
    assert change > 1e-3, f"{name} left the SecAgg+ aggregate unchanged ({change:.2e})"
    for k, value in secure.update.items():  # up to SecAgg+ quantization (2 * 8 / 2**22 per level)
        torch.testing.assert_close(value, expected[k], atol=5e-5, rtol=0)


def test_large_gaussian_noise_dominates_the_secure_aggregate(tiny_raw, plain_runs) -> None:
    """sigma = 100 (the issue's input): each client's entries are clipped to +-8 by SecAgg+, so the
    aggregate's norm is of order sqrt(d) * 8 / 2 instead of the clean 0.3."""
    raw = _raw(tiny_raw, [SECAGG, {"name": "gaussian_noise", "params": {"sigma": 100.0}}])
    (noisy,) = run_federation(parse_scenario(raw)).capture.updates
    clean = _norm(plain_runs["aggregate"].update)
    d = sum(v.numel() for v in noisy.update.values())
    assert clean < 1.0 and _norm(noisy.update) > 0.5 * np.sqrt(d), (clean, _norm(noisy.update), d)


CLIENT_SIDE = [(name, "fedsgd") for name in DEFENSES.names() if name != "secagg"]
CLIENT_SIDE += [(name, "fedavg") for name in [*UPDATE_STAGE, "dp_sgd", "dropout"]]


@pytest.mark.parametrize(("name", "protocol"), CLIENT_SIDE)
def test_both_client_paths_send_the_same_update(tiny_raw, monkeypatch, protocol, name) -> None:
    """Same client, same seed, same round: the update each SecAgg+ client hands to secaggplus_mod (before
    masking) is bit-identical to what the same client sends on the plain path, for every registered
    defense that validation lets run under secagg."""
    from fedsim.errors import FedsimError
    from fedsim.simulation import secure_client

    spec = {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}} if name == "dp_sgd" else _spec(name)
    tiny_raw["federation"]["protocol"] = protocol
    try:
        parse_scenario(_raw(tiny_raw, [SECAGG, spec]))
    except FedsimError as err:
        pytest.skip(f"refused at validation: {err}")
    plain = {u.partition_id: u for u in run_federation(parse_scenario(_raw(tiny_raw, [spec]))).capture.updates}
    sent: dict[int, list[np.ndarray]] = {}
    original = secure_client.SecureClient.fit

    def spy(self, parameters, config):  # noqa: ANN001, ANN202
        out = original(self, parameters, config)
        if int(config["server-round"]) == 1:
            sent[self.pid] = [np.array(a, copy=True) for a in out[0]]
        return out

    monkeypatch.setattr(secure_client.SecureClient, "fit", spy)
    run_federation(parse_scenario(_raw(tiny_raw, [SECAGG, spec])))
    assert sorted(sent) == sorted(plain) == [0, 1, 2, 3]
    for pid, u in plain.items():
        names = list(u.global_state)
        mine = dict(zip(names, (torch.from_numpy(a) for a in sent[pid]), strict=True))
        for k, theirs in u.update.items():
            got = mine[k] - u.global_state[k] if protocol == "fedavg" else mine[k]
            assert torch.equal(got, theirs), (pid, k)


def test_secure_dp_sgd_reports_epsilon_per_client_and_keeps_state(tiny_raw, tmp_path) -> None:
    """Under SecAgg+ every client reports its cumulative epsilon each round (the accountant history
    persists in the node's Context), the same as without SecAgg, and metrics.json carries it."""
    from fedsim.run import run_scenario

    dp = {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}
    plain = run_federation(parse_scenario(_raw(tiny_raw, [dp], rounds=3))).capture.client_metrics
    result = run_scenario(parse_scenario(_raw(tiny_raw, [SECAGG, dp], rounds=3)), tmp_path / "run")
    secure = result.client_metrics
    assert sorted(secure) == [1, 2, 3] and all(sorted(secure[r]) == [0, 1, 2, 3] for r in secure)
    for pid in range(4):
        eps = [secure[r][pid]["epsilon"] for r in (1, 2, 3)]
        assert 0 < eps[0] < eps[1] < eps[2], eps  # accumulates: the state persisted across rounds
        assert eps == [plain[r][pid]["epsilon"] for r in (1, 2, 3)]
    import json

    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["client_metrics"]
    assert written["3"]["2"]["epsilon"] == secure[3][2]["epsilon"]


def test_both_server_paths_write_the_same_round_rows(tiny_raw) -> None:
    """One row builder for both servers: the same fields each round (train loss, participation, test metrics
    only every ``evaluation.every`` rounds and after the last)."""
    raw = _raw(tiny_raw, [], rounds=3)
    raw["evaluation"] = {"every": 2}
    plain = run_federation(parse_scenario(raw)).history
    raw["defenses"] = [SECAGG]
    secure = run_federation(parse_scenario(raw)).history
    assert [sorted(h) for h in secure] == [sorted(h) for h in plain]
    assert [h["round"] for h in secure if "test_accuracy" in h] == [0, 2, 3]
    assert all(h["clients_aggregated"] == 4 and h["train_loss"] > 0 for h in secure if h["round"] >= 1)


@pytest.mark.ray
def test_secure_pipeline_gives_the_same_numbers_on_ray(tiny_raw) -> None:
    """SecAgg+ with an update-stage and a training-stage defense: the captured aggregate, the rows and every
    client's epsilon (state kept in the Ray node's Context) are identical on both backends."""
    raw = _raw(tiny_raw, [SECAGG, _spec("gaussian_noise"), {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}],
               rounds=2)
    scenario = parse_scenario(raw)
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")
    (a,), (b,) = local.capture.updates, ray.capture.updates
    assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
    keep = ("round", "test_loss", "test_accuracy", "train_loss", "clients_aggregated")
    assert [{k: h.get(k) for k in keep} for h in ray.history] == [{k: h.get(k) for k in keep} for h in local.history]
    assert ray.capture.client_metrics == local.capture.client_metrics and sorted(ray.capture.client_metrics[2]) == [
        0, 1, 2, 3]


@pytest.mark.parametrize("case", ["batchnorm-lone-example", "dp_sgd-poisson"])
def test_secure_ground_truth_is_the_batches_the_clients_really_used(tiny_raw, case) -> None:
    """The evaluator re-derives the SecAgg+ aggregate's ground truth; it must be exactly the union of the
    batches each client recorded on the plain path, also where the client's batch schedule depends on its
    model (a BatchNorm model merges a lone last example into the batch before) or on a defense (Poisson)."""
    raw = _raw(tiny_raw, [])
    raw["data"]["train_subset"] = 40  # iid: 10 examples a client
    fed = raw["federation"]
    if case == "batchnorm-lone-example":  # batch 3 over 10: 3 steps use 9, or all 10 with the lone one merged
        raw["model"] = {"name": "mlp", "width": 2, "norm": "batch"}
        fed.update(protocol="fedavg", local={"batch_size": 3, "steps": 3, "lr": 0.1})
    else:
        raw["defenses"] = [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}]
        fed.update(protocol="fedavg", local={"batch_size": 3, "steps": 2, "lr": 0.1})
    plain = run_federation(parse_scenario(raw)).capture.updates
    raw["defenses"] = [*raw["defenses"], SECAGG]
    (agg,) = run_federation(parse_scenario(raw)).capture.updates
    expected = torch.cat([u.truth.inputs for u in sorted(plain, key=lambda u: u.partition_id)])
    assert len(plain) == 4 and torch.equal(agg.truth.inputs, expected)
