"""DIFF2-GD through the real federation (defenses/diff2.py; spec algorithms-more.md §9).

Kinds guarded, each against an independent computation in this file (plain torch loops, per-example autograd):
the estimator (sigma = 0 and no clipping is plain GD on the mean of the clients' full-partition losses for every
T; T = 1 with noise is DP-GD with the same noise draws); the exact per-sample mean over chunks; what the
curious server sees under each noise placement (and the std of what the clients add); one server rule on both
server paths; the reference model of a difference recorded for the attacker; a client that missed a round
stops the run; validation errors name the YAML field.
"""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from defenses.diff2_client import MissedRoundError, clipped_mean_gradient
from fedsim.data import normalize
from fedsim.errors import ScenarioError, SimulationError
from fedsim.scenario import parse_scenario
from fedsim.seeding import torch_generator
from fedsim.simulation import run_federation
from fedsim.simulation.capture import AGGREGATE_ID
from fedsim.simulation.setup import setup_for

SECAGG = {"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}
BASE = {
    "name": "diff2-test", "seed": 3, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 80, "partition": {"kind": "iid"}},  # 4 clients x 20 digits
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": 4, "rounds": 2, "protocol": "fedsgd", "local": {"batch_size": 4, "lr": 0.5}},
    "backend": {"kind": "inprocess"},
    "evaluation": {"every": 100},
    "attacks": [],
}
NOISY = {"restart_period": 2, "c1": 1.0, "c2": 2.0, "sigma1": 0.05, "sigma2": 0.1, "chunk_size": 7}


def scenario_raw(params: dict, rounds: int = 2, secure: bool = False, capture: bool = False) -> dict:
    raw = copy.deepcopy(BASE)
    raw["federation"]["rounds"] = rounds
    raw["defenses"] = [{"name": "diff2", "params": params}] + ([SECAGG] if secure else [])
    if capture:  # targets make the capture record updates (the attacks themselves do not run here)
        raw["attacks"] = [{"name": "inverting_gradients", "rounds": [1, 2], "clients": "all",
                           "knowledge": {"labels": "known"}, "budget": {"iterations": 1}}]
    return raw


@lru_cache(maxsize=16)
def _run(text: str):  # noqa: ANN202 - one federation per distinct scenario, shared by the tests
    return run_federation(parse_scenario(json.loads(text)))


def run(raw: dict):  # noqa: ANN201
    return _run(json.dumps(raw, sort_keys=True))


def client_batches(raw: dict) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.nn.Module]:
    """Each client's whole partition, normalized as the clients do, and the initial global model."""
    setup = setup_for(parse_scenario(raw))
    data = [setup.client_data(p) for p in range(raw["federation"]["clients"])]
    return [(normalize(x, setup.task.mean, setup.task.std), y) for x, y in data], setup.build_model()


def brute_message(model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, clip: float | None,
                  reference: dict | None = None) -> dict[str, torch.Tensor]:
    """(1/n) sum_i clip(grad l(state; z_i) [- grad l(reference; z_i)]) by one autograd call per example."""
    model = copy.deepcopy(model)
    names = [k for k, _ in model.named_parameters()]

    def grad_at(weights: dict, i: int) -> list[torch.Tensor]:
        model.load_state_dict(weights, strict=False)
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        return [g.detach().clone() for g in torch.autograd.grad(loss, list(model.parameters()))]

    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        g = grad_at(state, i)
        if reference is not None:
            g = [a - b for a, b in zip(g, grad_at(reference, i), strict=True)]
        scale = 1.0 if clip is None else min(1.0, clip / float(torch.sqrt(sum((t**2).sum() for t in g))))
        total = [t + scale * a for t, a in zip(total, g, strict=True)]
    return {k: t / len(x) for k, t in zip(names, total, strict=True)}


def params_of(state: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: state[k] for k, _ in model.named_parameters()}


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
def captured(outcome, rnd: int) -> dict:  # noqa: ANN001
    return {u.partition_id: u for u in outcome.capture.updates if u.round == rnd}


def assert_standard_normal(values: torch.Tensor) -> None:
    """Mean 0 and std 1 within 5 standard errors of a sample of n: 1/sqrt(n) for the mean, 1/sqrt(2n) for the std."""
    n = values.numel()
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    assert abs(float(values.std()) - 1) < 5 / math.sqrt(2 * n)


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


# -- (8) validation names the YAML field -----------------------------------------------------------------------
@pytest.mark.parametrize(("change", "path", "match"), [
    (lambda r: r["federation"].update(protocol="fedavg"), "defenses[0]", "federation.protocol"),
    (lambda r: r["federation"].update(clients_per_round=2), "defenses[0]", "federation.clients_per_round"),
    (lambda r: r["defenses"][0]["params"].update(target_epsilon=3), "defenses[0].params.target_epsilon", "one of"),
    (lambda r: r["defenses"][0]["params"].update(sigma2=None), "defenses[0].params.sigma2", "restart_period 2"),
    (lambda r: r["defenses"][0]["params"].update(c1=None), "defenses[0].params.c1", "zero noise"),
    (lambda r: r["defenses"][0]["params"].update(calibration="rdp"), "defenses[0].params.calibration", "target"),
    (lambda r: r["defenses"][0]["params"].update(restart_period=0), "defenses[0].params.restart_period", "greater"),
    (lambda r: r["model"].update(dropout=0.3), "defenses[0]", "per-example gradients"),
    (lambda r: r["defenses"].append({"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}), "defenses[0]",
     "dp_sgd"),
])
def test_invalid_settings_are_refused_with_the_field_path(change, path, match) -> None:
    raw = scenario_raw(dict(NOISY))
    change(raw)
    with pytest.raises(ScenarioError, match=match) as err:
        parse_scenario(raw)
    assert err.value.path == path


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedsim.cli import app

    raw = scenario_raw({**NOISY, "noise_placement": "distributed"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "defenses[0].params.noise_placement" in result.output and "Traceback" not in result.output


# -- (9) a client that missed the previous round --------------------------------------------------------------
def test_a_difference_round_without_the_previous_model_fails_visibly() -> None:
    from fedsim.simulation.client_round import run_client_round

    scenario = parse_scenario(scenario_raw({**NOISY, "restart_period": 3}, rounds=3))
    start = setup_for(scenario).build_model().state_dict()
    state: dict = {}
    run_client_round(scenario, 0, 1, start, state)  # restart: it keeps x_1 and "1"
    assert state["diff2/model-round"] == "1"
    with pytest.raises(MissedRoundError, match="round 3 needs the global model of round 2, but client 0 holds "
                                               "round 1's"):
        run_client_round(scenario, 0, 3, start, dict(state))
    with pytest.raises(MissedRoundError, match="holds none"):
        run_client_round(scenario, 0, 2, start, {})
    run_client_round(scenario, 0, 2, start, state)  # the round after: fine


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_a_client_failing_in_a_diff2_run_stops_it(monkeypatch, secure) -> None:
    import fedsim.simulation.client_round as client_round

    real = client_round.local_update

    def local_update(job, *args, **kwargs):  # noqa: ANN001, ANN202
        if kwargs["partition_id"] == 1 and kwargs["round_num"] == 2:
            raise ValueError("injected")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(client_round, "local_update", local_update)
    raw = scenario_raw(dict(NOISY), rounds=3, secure=secure)
    with pytest.raises(SimulationError, match=r"client 1: ValueError: injected \(round 2\).*'diff2' needs every "
                                              "client's message every round"):
        run_federation(parse_scenario(raw))


# -- the attacker's view and the privacy block ----------------------------------------------------------------
def test_the_attack_view_carries_the_reference_model_of_a_difference() -> None:
    from fedsim.attacking import observe

    raw = scenario_raw(dict(NOISY), capture=True)
    scenario = parse_scenario(raw)
    outcome = run(raw)
    task = setup_for(scenario).task
    views = {u.round: observe(u, task, scenario, scenario.attacks[0], ()) for u in captured(outcome, 1).values()}
    views.update({u.round: observe(u, task, scenario, scenario.attacks[0], ()) for u in captured(outcome, 2).values()})
    assert views[1].reference_state is None
    torch.testing.assert_close(dict(views[2].reference_state), dict(views[1].global_state))
    assert len(captured(outcome, 1)[0].truth.inputs) == 20  # the ground truth is the whole partition


@pytest.mark.parametrize("placement", ["central", "local"])
def test_the_privacy_block_and_the_report_state_epsilon_released_and_against_the_server(placement) -> None:
    """Target epsilon 3 over 4 rounds, T = 2: sigmas from the closed form with alpha = 9 (by hand here), the
    released epsilon by dp_accounting's PLD on the two Gaussian events built here; central: inf against the
    server; local: z = sqrt(P) sigma n_min / 2 per event."""
    import dp_accounting

    from fedsim.privacy.summary import epsilon_fields, privacy_summary
    from fedsim.report.privacy import privacy_lines

    raw = scenario_raw({"restart_period": 2, "target_epsilon": 3, "noise_placement": placement}, rounds=4)
    outcome = run(raw)
    block = privacy_summary(outcome.history, outcome.capture.client_metrics)["diff2"]
    n, p = 20, 4
    sigma1 = math.sqrt(5 * 9 * 2 / (n**2 * p**2 * 3))  # c1 = 4u = 5, alpha = 1 + ceil(2 ln(1e5) / 3) = 9
    sigma2 = math.sqrt(20 * 9 * 4 / (n**2 * p**2 * 3))
    assert block["sigma1"] == pytest.approx(sigma1) and block["sigma2"] == pytest.approx(sigma2)

    def pld(z1: float, z2: float) -> float:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z1), 2))
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z2), 2))
        return acc.get_epsilon(1e-5)

    assert block["epsilon_dp_accounting_pld"] == pytest.approx(pld(sigma1 * n * p / 2, sigma2 * n * p / 2), rel=0.01)
    assert block["epsilon_exact"] < block["epsilon"] < block["epsilon_closed_form"] <= 3
    if placement == "central":
        assert math.isinf(block["epsilon_vs_server"])
    else:
        local = pld(2 * sigma1 * n / 2, 2 * sigma2 * n / 2)
        assert block["epsilon_dp_accounting_pld_vs_server"] == pytest.approx(local, rel=0.01)
        assert block["epsilon_vs_server"] > block["epsilon"]
    fields = epsilon_fields({"diff2": block})
    assert fields["epsilon"] == block["epsilon"] and fields["epsilon_level"] == "sample"
    text = "\n".join(privacy_lines({"diff2": block}))
    assert "DIFF2" in text and f"{block['epsilon_closed_form']:.3f}" in text and placement in text


@pytest.mark.ray
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_ray_gives_the_inprocess_numbers(secure) -> None:
    """Client state (x_(r-1) in the node's Context), client noise shares and the server estimator on real Ray:
    3 rounds with a difference round, local (plain) or distributed (SecAgg+) noise, bit-identical."""
    params = {**NOISY, "noise_placement": "distributed" if secure else "local"}
    scenario = parse_scenario(scenario_raw(params, rounds=3, secure=secure, capture=True))
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")
    assert [h.get("train_loss") for h in ray.history] == [h.get("train_loss") for h in local.history]
    assert len(ray.capture.updates) == len(local.capture.updates) > 0
    for a, b in zip(local.capture.updates, ray.capture.updates, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
        assert (a.reference_state is None) == (b.reference_state is None)
    assert all(torch.equal(local.final_state[k], ray.final_state[k]) for k in local.final_state)
