"""DIFF2-GD through the real federation (defenses/diff2.py; spec algorithms-more.md §9): the estimator and messages.

Kinds guarded, each against an independent computation (plain torch loops, per-example autograd in
``diff2_support``): the estimator (sigma = 0 and no clipping is plain GD on the mean of the clients' full-partition
losses for every T; T = 1 with noise is DP-GD with the same noise draws); the exact per-sample mean over chunks;
what the curious server sees under each noise placement (and the std of what the clients add); one server rule on
both server paths; a capture proxy that forwards every record. Validation, failures, the attacker's view and the
privacy block: test_diff2_runs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diff2_support import (
    NOISY,
    assert_standard_normal,
    brute_message,
    captured,
    client_batches,
    params_of,
    run,
    scenario_raw,
)

from fedsim.defenses.diff2_client import clipped_mean_gradient
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.seeding import torch_generator
from fedsim.simulation import run_federation
from fedsim.simulation.capture import AGGREGATE_ID


# -- (1) sigma = 0, no clipping: DIFF2-GD is plain GD, for every restart period ------------------------------
@pytest.mark.parametrize("period", [1, 2, 3, 5])
def test_noiseless_unclipped_diff2_is_plain_gradient_descent(period) -> None:
    """v_r telescopes to grad f(x_r) (spec §9.2): the federation's model after 6 rounds equals GD on
    f = (1/P) sum_p f_p computed here with one backward pass per round. Partitions of 20, 20, 19, 19: the mean
    over clients is uniform (a num-examples-weighted one would be GD on the pooled loss); chunk_size 7 divides none."""
    params = {"restart_period": period, "c1": None, "c2": None, "sigma1": 0.0, "sigma2": 0.0, "chunk_size": 7}
    raw = scenario_raw(params, rounds=6)
    raw["data"]["train_subset"] = 78
    got = run(raw).final_state
    data, model = client_batches(raw)
    for _ in range(6):
        model.zero_grad()
        loss = sum(F.cross_entropy(model(x), y) for x, y in data) / len(data)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    moved = max(float((got[k] - v).abs().max()) for k, v in client_batches(raw)[1].state_dict().items())
    assert moved > 1e-2  # the model did move: the comparison below is not between two initial models
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5)


# -- (2) T = 1 is DP-GD ---------------------------------------------------------------------------------------
def test_restart_period_one_is_dp_gd_with_the_same_noise() -> None:
    """Every round a restart: the model equals DP-GD written here (per-example autograd, clip C1, mean per
    client, uniform mean over clients, + N(0, (C1 sigma1)^2) drawn from (seed, "diff2", round) in parameter
    order, step lr). Clipping is active: some per-example norms exceed C1."""
    c1, sigma1, rounds = 0.5, 0.02, 3
    raw = scenario_raw({"restart_period": 1, "c1": c1, "sigma1": sigma1, "chunk_size": 7}, rounds=rounds)
    got = run(raw).final_state
    data, model = client_batches(raw)
    clipped = 0
    for rnd in range(1, rounds + 1):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        means = [brute_message(model, state, x, y, c1) for x, y in data]
        clipped += sum(float(torch.sqrt(sum((g**2).sum() for g in brute_message(model, state, x[i:i + 1],
                                                                                  y[i:i + 1], None).values()))) > c1
                       for x, y in data for i in range(len(x)))
        gen = torch_generator(raw["seed"], "diff2", rnd)
        with torch.no_grad():
            for k, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (c1 * sigma1)
                p -= 0.5 * (sum(m[k] for m in means) / len(means) + noise)
    assert clipped > 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5)


# -- (5) the exact per-sample mean over chunks ----------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 20, 64])
def test_the_message_is_the_exact_per_example_mean_whatever_the_chunks(chunk) -> None:
    """A restart message and a difference message (clip active on both), chunked by 1, 7 (not dividing n = 20),
    20 and 64, equal the per-example autograd loop: each example weighs 1/n, not 1/(chunk count * chunk)."""
    data, model = client_batches(scenario_raw(NOISY))
    x, y = data[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    params, ref = params_of(state, model), params_of(reference, model)
    for clip, against in ((0.3, None), (0.05, ref)):
        got = clipped_mean_gradient(model, params, x, y, F.cross_entropy, clip, chunk, against)
        want = brute_message(model, state, x, y, clip, reference if against is not None else None)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


# -- (6) noise placements: what the curious server sees -------------------------------------------------------
def test_central_noise_is_added_after_the_server_has_seen_every_clean_message() -> None:
    noisy = run(scenario_raw({**NOISY, "noise_placement": "central"}, capture=True))
    clean = run(scenario_raw({**NOISY, "sigma1": 0.0, "sigma2": 0.0}, capture=True))
    data, model = client_batches(scenario_raw(NOISY))
    for pid, u in captured(noisy, 1).items():  # round 1: same model, the server sees the clean message
        want = brute_message(model, u.global_state, *data[pid], NOISY["c1"])
        for k in want:
            torch.testing.assert_close(u.update[k], captured(clean, 1)[pid].update[k], atol=0, rtol=0)
            torch.testing.assert_close(u.update[k], want[k], atol=1e-6, rtol=1e-5)
    gap = max(float((noisy.final_state[k] - clean.final_state[k]).abs().max()) for k in clean.final_state)
    assert gap > 1e-3  # the released model did get noise


def test_local_noise_is_in_every_message_the_server_sees_with_the_calibrated_std() -> None:
    """Each client adds N(0, P s_r^2): s_r = C1 sigma1 in the restart round, C2 dx sigma2 in the difference round,
    dx computed here from the two global models the capture recorded. The clean part is recomputed here."""
    outcome = run(scenario_raw({**NOISY, "noise_placement": "local"}, capture=True))
    data, model = client_batches(scenario_raw(NOISY))
    for rnd in (1, 2):
        z = []
        for pid, u in captured(outcome, rnd).items():
            if rnd == 1:
                assert u.reference_state is None
                want = brute_message(model, u.global_state, *data[pid], NOISY["c1"])
                std = 2 * NOISY["c1"] * NOISY["sigma1"]  # sqrt(P) = 2
            else:
                assert u.reference_state is not None
                torch.testing.assert_close(dict(u.reference_state), captured(outcome, 1)[pid].global_state)
                dx = math.sqrt(sum(float(((u.global_state[k] - u.reference_state[k]) ** 2).sum())
                                   for k in params_of(u.global_state, model)))
                want = brute_message(model, u.global_state, *data[pid], NOISY["c2"] * dx, dict(u.reference_state))
                std = 2 * NOISY["c2"] * dx * NOISY["sigma2"]
            for k in want:
                added = u.update[k] - want[k]
                torch.testing.assert_close(added, u.truth.extras[f"diff2/noise/{k}"], atol=1e-5, rtol=0)
                z.append((added / std).flatten())
        assert_standard_normal(torch.cat(z))


def test_distributed_shares_need_secagg_and_the_aggregate_carries_their_sum() -> None:
    with pytest.raises(ScenarioError, match="secagg") as err:
        parse_scenario(scenario_raw({**NOISY, "noise_placement": "distributed"}))
    assert err.value.path == "defenses[0].params.noise_placement"
    secure = run(scenario_raw({**NOISY, "noise_placement": "distributed"}, secure=True, capture=True))
    local = run(scenario_raw({**NOISY, "noise_placement": "local"}, capture=True))
    clean = run(scenario_raw({**NOISY, "noise_placement": "central"}, capture=True))
    (agg,) = captured(secure, 1).values()
    assert agg.partition_id == AGGREGATE_ID and agg.reference_state is None
    # equal partitions: each share is N(0, (s N / (n_p sqrt P))^2) = N(0, P s^2), the same draw as the local
    # placement's; the aggregate is the mean of the clients' noised messages (up to SecAgg+ quantization)
    messages, clean_msgs = captured(local, 1), captured(clean, 1)
    noise = []
    for k, value in agg.update.items():
        torch.testing.assert_close(value, sum(m.update[k] for m in messages.values()) / 4, atol=5e-5, rtol=0)
        noise.append(((value - sum(m.update[k] for m in clean_msgs.values()) / 4)
                      / (NOISY["c1"] * NOISY["sigma1"])).flatten())
    assert_standard_normal(torch.cat(noise))  # the aggregate carries the released noise N(0, (C1 sigma1)^2)
    (agg2,) = captured(secure, 2).values()  # the difference round's reference is the model of round 1
    torch.testing.assert_close(dict(agg2.reference_state), agg.global_state)


# -- (7) one server rule on both server paths ----------------------------------------------------------------
def test_plain_and_secagg_paths_apply_the_same_estimator_and_noise() -> None:
    """T = 2 with central noise over 4 rounds (2 restarts, 2 differences): equal partitions make SecAgg+'s
    weighted mean the plain path's uniform mean, so the two final models differ only by SecAgg+'s quantization.
    The default FedSGD step (x - lr * mean) ends far from both: that is what the comparison can tell apart."""
    params = {**NOISY, "noise_placement": "central"}
    plain = run(scenario_raw(params, rounds=4))
    secure = run(scenario_raw(params, rounds=4, secure=True))
    plain_sgd = run_federation(parse_scenario({**scenario_raw(params, rounds=4), "defenses": []}))
    gaps = [max(float((a.final_state[k] - b.final_state[k]).abs().max()) for k in a.final_state)
            for a, b in ((plain, secure), (plain, plain_sgd))]
    assert gaps[0] < 1e-4 < 1e-2 < gaps[1]
    for a, b in zip(plain.history[1:], secure.history[1:], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


def test_the_capture_proxy_forwards_every_record_of_a_targeted_message(monkeypatch) -> None:
    """The proxy re-sends a targeted client's message with its config flagged: a record beyond arrays and config
    (a protocol that sends more) must travel too."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # Flower stamps messages with the run and node ids (no run here)
        monkeypatch.setattr(TaskIdentity, key, 1)

    from fedsim.errors import NoProgressError
    from fedsim.simulation import keys
    from fedsim.simulation.capture import CaptureLog, CapturingGrid

    class Inner:
        seen: list = []

        def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN202
            Inner.seen = list(messages)
            return []

    content = RecordDict({keys.ARRAYS: ArrayRecord({"w": torch.ones(2)}),
                          keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}), "extra": ConfigRecord({"mode": "diff"})})
    msg = Message(content, dst_node_id=11, message_type=MessageType.TRAIN)
    proxy = CapturingGrid(Inner(), CaptureLog(targets={(1, 0)}, protocol="fedsgd"), {11: 0})
    with pytest.raises(NoProgressError):  # no reply came back
        proxy.send_and_receive([msg])
    (sent,) = Inner.seen
    assert sent.content["extra"]["mode"] == "diff" and sent.content[keys.CONFIG][keys.RECORD_TRUTH]
