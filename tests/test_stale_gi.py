"""The server's gradient-inversion conversion of stale updates (``aggregation: gi_conversion``; spec
``algorithms-more.md`` §12.2) and the leakage of its estimates.

Expected values come from outside the rule's code: the recomputed update from a plain ``torch.optim.SGD`` loop on
the estimate; the exact-estimate (oracle) case from the client's own round (``run_client_round``) on its real
data; lambda_t and the mixing from hand arithmetic; the leakage from hand-made images and labels.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import referenced_names

import fedsim.simulation.stale_gi as stale_gi
from fedsim.data.transforms import normalize
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.client_round import run_client_round
from fedsim.simulation.setup import setup_for
from fedsim.simulation.stale_gi import EstimateRecord, gi_conversion, mixing_weight, settings
from fedsim.simulation.stale_leakage import score_estimate
from fedsim.simulation.staleness import STALE_RULES, StaleArrival
from fedsim.stale_gi_spec import GIConversion

GI = {"num_estimates": 4, "iterations": 3, "lr": 0.1, "topk": 0.2}


def gi_raw(tiny_raw: dict[str, Any], gi: dict[str, Any] | None = None, **local: Any) -> dict[str, Any]:
    """4 digits clients, 2 per round round-robin (0,1 | 2,3 | ...), client 1 slow by tau = 2, 6 rounds (its stale
    arrivals: rounds 3 and 5); two full-batch local steps unless ``local`` says otherwise."""
    raw = copy.deepcopy(tiny_raw)
    raw["federation"] = {"clients": 4, "rounds": 6, "protocol": "fedavg", "clients_per_round": 2,
                         "local": {"batch_size": 1000, "lr": 0.5, "steps": 2, **local},
                         "staleness": {"tau": 2, "slow_clients": [1], "schedule": "round_robin",
                                       "aggregation": "gi_conversion", "gi": {**GI, **(gi or {})}}}
    raw["attacks"] = []
    return raw


def arrival_for(scenario, round_num: int = 5, memory: dict | None = None) -> StaleArrival:  # noqa: ANN001
    """Client 1's stale arrival: a real client round from a base model, and a different current model."""
    gen = torch.Generator().manual_seed(3)
    base = setup_for(scenario).build_model().state_dict()
    current = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    reply = run_client_round(scenario, 1, round_num, base, {})
    return StaleArrival(round=round_num, partition_id=1, tau=2, base=base, local=reply.sent, current=current,
                        num_examples=reply.num_examples, memory={} if memory is None else memory)


def sgd_round(scenario, start: dict, x: torch.Tensor, soft: torch.Tensor) -> dict:  # noqa: ANN001
    """A client round written out: E plain-SGD steps of soft-label cross-entropy on (x, soft), full batch."""
    model = setup_for(scenario).build_model()
    model.load_state_dict(start)
    model.train()
    local = scenario.federation.local
    opt = torch.optim.SGD(model.parameters(), lr=local.lr, weight_decay=local.weight_decay)
    for _ in range(local.steps):
        opt.zero_grad()
        F.cross_entropy(model(x), soft).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_recomputed_update_is_a_client_round_on_the_estimate_from_the_current_model(tiny_raw) -> None:
    scenario = parse_scenario(gi_raw(tiny_raw))
    arrival = arrival_for(scenario)
    out = gi_conversion(arrival, scenario)  # lambda = 1: the recomputed update alone
    x, logits = arrival.memory["estimate"]
    assert x.shape == (4, 1, 8, 8) and logits.shape == (4, 10)
    fresh = sgd_round(scenario, arrival.current, x, logits.softmax(-1))
    for k, v in out.items():
        assert torch.allclose(v, fresh[k], atol=1e-6), k
    # and not the direct rebase (the conversion changed something)
    assert any(not torch.allclose(v, STALE_RULES["direct"](arrival, scenario)[k], atol=1e-4) for k, v in out.items())


def test_lambda_schedule_is_the_spec_one() -> None:
    arrival = lambda t, memory: StaleArrival(round=t, partition_id=0, tau=2, base={"w": torch.ones(2)},  # noqa: E731
                                             local={"w": torch.ones(2)}, current={"w": torch.ones(2) * 2},
                                             num_examples=1, memory=memory)
    hard, decay = GIConversion(switch_round=3), GIConversion(switch_round=3, mix="decay", gamma=0.5)
    assert [mixing_weight(arrival(t, {}), hard) for t in range(1, 6)] == [1, 1, 0, 0, 0]
    assert [mixing_weight(arrival(t, {}), decay) for t in range(1, 6)] == [1, 1, 1, 0.5, 0.25]
    assert mixing_weight(arrival(50, {}), GIConversion()) == 1  # no switch asked for: always convert
    # drift |w - w_base| / |w| = |(1, 1)| / |(2, 2)| = 0.5: below 0.6 switches at the arrival's round, not below 0.4
    memory: dict = {}
    assert mixing_weight(arrival(7, memory), GIConversion(drift_threshold=0.6, mix="decay", gamma=0.5)) == 1
    assert memory["drift_switch"] == 7
    assert mixing_weight(arrival(9, memory), GIConversion(drift_threshold=0.6, mix="decay", gamma=0.5)) == 0.25
    assert mixing_weight(arrival(9, {}), GIConversion(drift_threshold=0.4)) == 1


def test_mixing_is_lambda_recomputed_plus_one_minus_lambda_stale(tiny_raw) -> None:
    scenario = parse_scenario(gi_raw(tiny_raw, {"switch_round": 3, "mix": "decay", "gamma": 0.5}))
    arrival = arrival_for(scenario, round_num=5)  # lambda = 0.5^(5-3) = 0.25
    out = gi_conversion(arrival, scenario)
    x, logits = arrival.memory["estimate"]
    fresh = sgd_round(scenario, arrival.current, x, logits.softmax(-1))
    for k, v in out.items():
        w, d_hat, d = arrival.current[k], fresh[k] - arrival.current[k], arrival.local[k] - arrival.base[k]
        assert torch.allclose(v, w + 0.25 * d_hat + 0.75 * d, atol=1e-6), k
    # hard switch: from round s on the stale update as it came, and no inversion
    scenario = parse_scenario(gi_raw(tiny_raw, {"switch_round": 5}))
    arrival = arrival_for(scenario, round_num=5)
    out = gi_conversion(arrival, scenario)
    assert "estimate" not in arrival.memory and "estimate_record" not in arrival.memory
    for k, v in out.items():
        assert torch.allclose(v, arrival.current[k] + arrival.local[k] - arrival.base[k], atol=1e-7), k


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_begins_at_the_previous_estimate(tiny_raw, warm) -> None:
    # a vanishing step size: each inversion ends where it began, so its result shows its starting point
    scenario = parse_scenario(gi_raw(tiny_raw, {"lr": 1e-12, "warm_start": warm}))
    memory: dict = {}
    gi_conversion(arrival_for(scenario, 3, memory), scenario)
    first = memory["estimate"][0].clone()
    first_record = memory.pop("estimate_record")
    gi_conversion(arrival_for(scenario, 5, memory), scenario)
    second, record = memory["estimate"][0], memory["estimate_record"]
    assert not first_record.warm and record.warm == warm
    assert torch.allclose(second, first, atol=1e-6) == warm  # a cold start draws a new (round 5) init


def test_exact_estimate_gives_the_fresh_update_oracle(tiny_raw, monkeypatch) -> None:
    """ORACLE (test only): the inversion replaced by the client's true data and one-hot labels; the converted
    model must then be the one the client would have sent, had it trained from the current model."""
    scenario = parse_scenario(gi_raw(tiny_raw))
    arrival = arrival_for(scenario)
    setup = setup_for(scenario)
    inputs, labels = setup.client_data(1)
    assert len(inputs) <= scenario.federation.local.batch_size  # the client's steps are full-batch

    def oracle_invert(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        return normalize(inputs, setup.task.mean, setup.task.std), 1e4 * F.one_hot(labels, 10).float(), 0.0, False

    monkeypatch.setattr(stale_gi, "invert", oracle_invert)
    out = gi_conversion(arrival, scenario)
    fresh = run_client_round(scenario, 1, arrival.round, arrival.current, {}).sent
    for k, v in out.items():
        assert torch.allclose(v, fresh[k], atol=1e-5), k


def test_the_objective_is_l1_on_the_topk_entries(tiny_raw, monkeypatch) -> None:
    delta = [torch.tensor([0.1, -3.0, 0.5]), torch.tensor([[2.0, 0.2]])]
    masks = stale_gi.topk_masks(delta, 0.4)  # ceil(0.4 * 5) = 2 entries: -3 and 2
    assert masks[0].tolist() == [False, True, False] and masks[1].tolist() == [[True, False]]
    pred = [torch.zeros(3), torch.ones(1, 2)]
    assert float(stale_gi.l1_topk(pred, delta, masks)) == pytest.approx(3.0 + 1.0)  # |0 - -3| + |1 - 2|
    seen, original = [], stale_gi.topk_masks
    monkeypatch.setattr(stale_gi, "topk_masks", lambda d, f: seen.append(f) or original(d, f))
    scenario = parse_scenario(gi_raw(tiny_raw, {"topk": 0.3}))
    gi_conversion(arrival_for(scenario), scenario)
    assert seen == [0.3]  # the inversion matches the configured fraction


def test_leakage_scores_by_hand() -> None:
    truth = torch.zeros(3, 1, 4, 4)
    truth[1] += 0.5
    truth[2] += 1.0
    pixels = torch.stack([truth[1] + 0.1, truth[2]])  # nearest mse 0.01 -> 20 dB; an exact copy -> the 100 dB cap
    soft = F.one_hot(torch.tensor([1, 3]), 4).float()
    record = EstimateRecord(round=1, partition_id=0, tau=1, lam=1.0, pixels=pixels, soft_labels=soft, loss=0.0,
                            iterations=1, seconds=0.0, warm=False)
    score = score_estimate(record, truth, torch.tensor([1, 1, 2]))
    assert math.isclose(score["psnr"], (20.0 + 100.0) / 2, abs_tol=1e-4)
    assert score["psnr_best"] == 100.0
    assert math.isclose(score["psnr_trivial"], 100.0)  # flat gray 0.5 (a blind guess) is truth[1] itself
    # labels: estimate shares {1: 1/2, 3: 1/2}, client's {1: 2/3, 2: 1/3}: overlap min(1/2, 2/3) = 1/2
    assert math.isclose(score["label_acc"], 0.5)


def test_every_inversion_is_scored_in_the_round_rows(tiny_raw, tmp_path) -> None:
    import json

    from fedsim.run import run_scenario

    scenario = parse_scenario(gi_raw(tiny_raw))
    run_scenario(scenario, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["utility"]
    rows = {int(r["round"]): r for r in history}
    assert [t for t, r in rows.items() if "gi_inversions" in r] == [3, 5]  # client 1's stale arrivals
    for t in (3, 5):
        r = rows[t]
        assert r["gi_inversions"] == 1 and r["gi_lambda"] == 1.0 and r["gi_seconds"] > 0
        assert {"gi_psnr", "gi_psnr_best", "gi_psnr_trivial", "gi_psnr_margin", "gi_ssim_matched", "gi_label_acc",
                "gi_label_trivial", "gi_loss"} <= set(r)
        assert r["clients_stale"] == 1
    text = (tmp_path / "run" / "summary.md").read_text()
    assert "The server inverted 2 stale update(s)" in text and "best of the blind guesses" in text
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="stale-gi"' in page and "best blind guess" in page
    # deterministic from the seed
    once, again = run_federation(scenario), run_federation(parse_scenario(gi_raw(tiny_raw)))
    assert all(torch.equal(again.final_state[k], once.final_state[k]) for k in once.final_state)
    assert [r.get("gi_psnr") for r in again.history] == [r.get("gi_psnr") for r in once.history]
    assert [r.get("gi_psnr") for r in once.history] == [r.get("gi_psnr") for r in history]


@pytest.mark.parametrize(("gi", "local", "path"), [
    ({"topk": 0}, {}, "federation.staleness.gi.topk"),
    ({"iterations": 0}, {}, "federation.staleness.gi.iterations"),
    ({"gamma": 1.5}, {}, "federation.staleness.gi.gamma"),
    ({"mix": "cosine"}, {}, "federation.staleness.gi.mix"),
    ({"typo": 1}, {}, "federation.staleness.gi.typo"),
    ({}, {"optimizer": "adam"}, "federation.local.optimizer"),
    ({}, {"momentum": 0.9}, "federation.local.momentum"),
])
def test_bad_gi_settings_are_refused_at_their_path(tiny_raw, gi, local, path) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(gi_raw(tiny_raw, gi, **local))
    assert err.value.path == path, str(err.value)


def test_gi_settings_without_gi_conversion_are_refused(tiny_raw) -> None:
    raw = gi_raw(tiny_raw)
    raw["federation"]["staleness"]["aggregation"] = "direct"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "federation.staleness.gi"
    del raw["federation"]["staleness"]["gi"]
    raw["federation"]["staleness"]["aggregation"] = "gi_conversion"
    assert settings(parse_scenario(raw)) == GIConversion()  # defaults


FORBIDDEN = {"client_data", "load_dataset", "train_x", "train_y", "test_x", "test_y", "partitions", "GroundTruth",
             "truth", "fedsim.metrics", "fedsim.simulation.stale_leakage", "fedsim.simulation.capture"}


def test_the_rule_cannot_reach_ground_truth() -> None:
    path = Path(stale_gi.__file__)
    names = referenced_names(path)
    hits = {n for n in names for bad in FORBIDDEN if n == bad or n.startswith(bad + ".")}
    assert not hits, f"{path.name} references {hits}"


class _Metadata:
    """The dataset with its examples locked away: only what describes the task can be read."""

    def __init__(self, data: Any) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name in ("train_x", "train_y", "test_x", "test_y"):
            raise AssertionError(f"the server's rule read data.{name}")
        return getattr(self._data, name)


class _Locked:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("the server's rule read the partitions")

    def __getitem__(self, key: Any) -> Any:
        raise AssertionError("the server's rule read the partitions")


def test_the_rule_runs_without_any_client_data(tiny_raw, monkeypatch) -> None:
    scenario = parse_scenario(gi_raw(tiny_raw))
    arrival = arrival_for(scenario)
    setup = setup_for(scenario)
    setup.task  # noqa: B018 - metadata computed before the lock (the server knows the task)
    monkeypatch.setitem(setup.__dict__, "data", _Metadata(setup.data))
    monkeypatch.setitem(setup.__dict__, "partitions", _Locked())
    monkeypatch.setattr(type(setup), "client_data", lambda self, pid: (_ for _ in ()).throw(AssertionError(pid)))
    out = gi_conversion(arrival, scenario)
    assert set(out) == set(arrival.local) and "estimate_record" in arrival.memory


@pytest.mark.ray
@pytest.mark.slow  # the staleness feature's default Ray test is tests/test_staleness.py's (suite budget)
def test_gi_conversion_on_ray_gives_the_inprocess_numbers(tiny_raw) -> None:
    scenario = parse_scenario(gi_raw(tiny_raw, {"init": "gray", "tv": 0.1, "topk": 1.0}))  # the shipped repair
    local, ray = run_federation(scenario), run_federation(scenario, backend="ray")
    assert all(torch.equal(local.final_state[k], ray.final_state[k]) for k in local.final_state)
    assert [r.get("gi_psnr") for r in ray.history] == [r.get("gi_psnr") for r in local.history]


def hand_tv(img: list[list[float]]) -> float:
    """Anisotropic TV of one H x W image written out: mean |vertical| + mean |horizontal| neighbour difference."""
    h, w = len(img), len(img[0])
    vert = [abs(img[i + 1][j] - img[i][j]) for i in range(h - 1) for j in range(w)]
    horiz = [abs(img[i][j + 1] - img[i][j]) for i in range(h) for j in range(w - 1)]
    return sum(vert) / len(vert) + sum(horiz) / len(horiz)


def test_total_variation_by_hand() -> None:
    img = [[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]]  # vertical |2|,|1|,|-4| -> 7/3; horizontal 1,2,0,3 -> 6/4
    assert hand_tv(img) == pytest.approx(7 / 3 + 1.5)
    assert float(stale_gi.total_variation(torch.tensor(img).view(1, 1, 2, 3))) == pytest.approx(hand_tv(img))


@pytest.mark.parametrize(("init", "low", "high"), [("gray", 0.07, 0.13), ("normal", 0.6, 1.4)])
def test_cold_start_is_gray_plus_small_noise_or_standard_normal(tiny_raw, init, low, high) -> None:
    # a vanishing step size: the estimate stays at its cold start (normalized space, where 0 is the dataset mean)
    scenario = parse_scenario(gi_raw(tiny_raw, {"lr": 1e-12, "init": init, "num_estimates": 16}))
    arrival = arrival_for(scenario)
    gi_conversion(arrival, scenario)
    x = arrival.memory["estimate"][0]
    box_low = float(normalize(torch.zeros(1), setup_for(scenario).task.mean, setup_for(scenario).task.std))
    inside = x[x > box_low + 1e-6]  # the box clamps the dark side of N(0, 1); the std of the rest still tells
    assert low < float(inside.std()) < high
    if init == "gray":
        assert float(x.abs().max()) < 0.6 and abs(float(x.mean())) < 0.02


def test_tv_prior_smooths_the_estimate(tiny_raw) -> None:
    def tv_of(tv: float) -> float:
        scenario = parse_scenario(gi_raw(tiny_raw, {"tv": tv, "iterations": 30, "lr": 0.05, "init": "gray"}))
        arrival = arrival_for(scenario)
        gi_conversion(arrival, scenario)
        x = arrival.memory["estimate"][0]
        return sum(hand_tv(img[0].tolist()) for img in x) / len(x)

    assert tv_of(1e4) < 0.5 * tv_of(0.0)  # the prior dominates: the estimate is much smoother than without it


def test_report_section_puts_slow_class_accuracy_beside_cost_and_leakage() -> None:
    from fedsim.report.stale_gi import stale_gi_section

    assert stale_gi_section([{"round": 1, "test_accuracy_class5": 0.5}]) == ""  # no inversion: no section
    history = [{"round": t, "test_accuracy_class5": a} for t, a in zip(range(1, 9), [0, .1, .2, .3, .4, .5, .6, .9],
                                                                        strict=True)]
    history[6].update(gi_inversions=1, gi_seconds=1.25, gi_lambda=1.0, gi_psnr=11.0, gi_psnr_best=13.5,
                      gi_psnr_trivial=14.5, gi_label_acc=0.75, gi_label_trivial=0.1)
    history[7].update(gi_inversions=2, gi_failed=1, gi_seconds=2.5, gi_lambda=0.5, gi_psnr=9.0, gi_psnr_best=12.0,
                      gi_psnr_trivial=14.5, gi_label_acc=0.25, gi_label_trivial=0.1)
    html = stale_gi_section(history)
    # last quarter of 8 rounds = rounds 7, 8: (0.6 + 0.9) / 2 = 75.0 %; last round 90.0 %
    assert "75.0 % (mean of the last quarter" in html and "last round 90.0 %" in html
    assert "3 in 3.8 s of server CPU; 1 failed" in html  # 1 + 2 inversions, 1.25 + 2.5 s
    # (11 + 9) / 2 = 10 dB against the best blind guess's 14.5: the section says it is NOT above it
    assert "10.00 dB vs 14.50 dB for the best blind guess (NOT above it: margin -4.50 dB); best estimate 13.50" in html
    assert "0.50 vs 0.10 for the best blind guess (above it: margin +0.40)" in html  # labels (0.75 + 0.25) / 2
    assert html.count("<tr class") == 2  # one table row per round with inversions
    assert "switched to stale aggregation" not in html
    history[7]["gi_switch_round"] = 7  # the server recorded the switch round it used
    assert "round 7 (lambda_t below 1" in stale_gi_section(history)


def test_drift_detector_switches_in_a_run_at_the_first_arrival_below_the_threshold(tiny_raw, monkeypatch) -> None:
    """In a real run: the detector stops inverting at the first stale arrival whose relative drift of the server's
    own models, ``|w^{t-1} - w^{t-1-tau}| / |w^{t-1}|`` (recomputed here in float64 numpy), is below the threshold."""
    import numpy as np

    drifts: dict[int, float] = {}
    rule = STALE_RULES["gi_conversion"]

    def spy(arrival: StaleArrival, scenario) -> dict:  # noqa: ANN001
        cur = np.concatenate([arrival.current[k].double().numpy().ravel() for k in arrival.current])
        old = np.concatenate([arrival.base[k].double().numpy().ravel() for k in arrival.current])
        drifts[arrival.round] = float(np.linalg.norm(cur - old) / np.linalg.norm(cur))
        return rule(arrival, scenario)

    monkeypatch.setitem(STALE_RULES, "gi_conversion", spy)
    raw = gi_raw(tiny_raw)
    raw["federation"]["rounds"] = 30
    raw["federation"]["staleness"]["tau"] = 6  # client 1's stale arrivals: rounds 7, 9, ..., 29
    free = run_federation(parse_scenario(raw)).history
    assert sorted(drifts) == list(range(7, 30, 2))
    assert [int(r["round"]) for r in free if r.get("gi_inversions")] == list(range(7, 30, 2))
    # the first arrival whose drift is below every earlier one's; a threshold halfway between makes it the switch
    order = sorted(drifts)
    expected = next((t for t in order[1:] if drifts[t] < min(drifts[u] for u in order if u < t)), None)
    assert expected is not None, str(sorted(drifts.items()))
    threshold = (drifts[expected] + min(drifts[u] for u in order if u < expected)) / 2
    raw["federation"]["staleness"]["gi"]["drift_threshold"] = threshold
    drifts.clear()
    switched = run_federation(parse_scenario(raw)).history
    assert [int(r["round"]) for r in switched if r.get("gi_inversions")] == [t for t in order if t < expected]
    from fedsim.report.stale_gi import summary_line, switch_round

    assert switch_round(free) is None and switch_round(switched) == expected  # the outputs say where it switched
    assert f"It switched to stale aggregation (lambda_t below 1) at round {expected};" in summary_line(switched)
