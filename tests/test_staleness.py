"""Slow clients and stale-update aggregation (``federation.staleness``; spec algorithms-more.md §12.1, §12.3).

Expected values come from outside the server code under test: the round-robin schedule from a chunked stream of
client ids; the global models from a brute-force federation written here (every round's clients trained with
``run_client_round`` from the model the spec says, each rule applied by its formula, the weighted mean by hand);
the rules from small tensors worked out by hand.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from fedsim.attacking import observe
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation
from fedsim.simulation.client_round import run_client_round
from fedsim.simulation.setup import setup_for
from fedsim.simulation.staleness import STALE_RULES, StaleArrival, round_robin, slow_partitions

TAU = 2
ROUNDS = 6


def stale_raw(tiny_raw: dict[str, Any], aggregation: str = "direct", **staleness: Any) -> dict[str, Any]:
    """4 digits clients, 2 per round (round-robin: 0,1 | 2,3 | 0,1 ...), client 1 slow by tau = 2; every update
    of every round captured (the capture keeps what each client was sent)."""
    raw = copy.deepcopy(tiny_raw)
    raw["federation"] = {"clients": 4, "rounds": ROUNDS, "protocol": "fedavg", "clients_per_round": 2,
                         "local": {"batch_size": 8, "lr": 0.5, "steps": 2},
                         "staleness": {"tau": TAU, "slow_clients": [1], "schedule": "round_robin",
                                       "aggregation": aggregation, **staleness}}
    raw["attacks"] = [{"name": "inverting_gradients", "every": 1, "clients": "all", "budget": {"iterations": 1}}]
    return raw


def test_round_robin_is_the_papers_chunked_stream() -> None:
    for n, m in ((4, 2), (10, 3), (7, 7), (5, 2)):
        stream = itertools.cycle(range(n))  # 0, 1, ..., n-1, 0, 1, ...: round t takes the next m
        for t in range(1, 3 * n + 1):
            assert round_robin(t, n, m) == sorted(next(stream) for _ in range(m)), (n, m, t)


def test_slow_class_picks_the_clients_holding_most_of_it(tiny_raw) -> None:
    tiny_raw["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.3}
    tiny_raw["federation"] = {"clients": 6, "protocol": "fedavg", "rounds": 6,
                              "staleness": {"tau": 5, "slow_class": 3, "num_slow": 2}}
    scenario = parse_scenario(tiny_raw)
    setup = setup_for(scenario)
    counts = np.array([np.sum(setup.data.train_y.numpy()[p] == 3) for p in setup.partitions])
    expected = sorted(int(i) for i in np.argsort(-counts, kind="stable")[:2])
    assert counts[expected].min() > np.delete(counts, expected).max()  # the draw has a clear top two
    labels = [setup.data.train_y[p] for p in setup.partitions]
    assert slow_partitions(scenario.federation.staleness, labels) == expected


def by_hand(arrival: StaleArrival, rule: str, lam: float = 4.0) -> dict[str, torch.Tensor]:
    """Spec §12.3's table, written out (w = current, d = local - base)."""
    out = {}
    for k in arrival.local:
        w, base, d = arrival.current[k], arrival.base[k], arrival.local[k] - arrival.base[k]
        out[k] = {"direct": w + d, "downweight": w + 2.0 ** (-arrival.tau / 20) * d,
                  "dc_asgd": w + d - lam * d * d * (w - base)}[rule]
    return out


def test_each_rule_is_its_formula_on_known_updates() -> None:
    base, local, current = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.5, 1.0, -1.0]), torch.tensor([2.0, 2.0, 0.0])
    arrival = StaleArrival(round=41, partition_id=0, tau=40, base={"w": base}, local={"w": local},
                           current={"w": current}, num_examples=3)
    spec = parse_scenario({"name": "s", "data": {"dataset": "digits"}, "federation": {
        "protocol": "fedavg", "rounds": 41, "staleness": {"tau": 40, "slow_clients": [0], "dc_lambda": 4.0}}})
    # delta = (0.5, -1, 0); current - base = (1, 0, 1)
    assert torch.allclose(STALE_RULES["direct"](arrival, spec)["w"], torch.tensor([2.5, 1.0, 0.0]))
    assert torch.allclose(STALE_RULES["downweight"](arrival, spec)["w"], torch.tensor([2.125, 1.75, 0.0]))  # x0.25
    # dc: delta - 4 * delta^2 * (current - base) = (0.5 - 4*0.25*1, -1 - 0, 0) = (-0.5, -1, 0)
    assert torch.allclose(STALE_RULES["dc_asgd"](arrival, spec)["w"], torch.tensor([1.5, 1.0, 0.0]))
    for rule in ("direct", "downweight", "dc_asgd"):  # gi_conversion: tests/test_stale_gi.py
        assert torch.allclose(STALE_RULES[rule](arrival, spec)["w"], by_hand(arrival, rule)["w"])


def brute_force(scenario) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    """The federation written out: ``models[r]`` = w^r. Round t: the schedule's clients train (run_client_round)
    from w^{t-1}, the slow one from w^{t-1-tau} once t > tau; its model is rebased by the rule's formula; the
    next model is the num-examples-weighted mean."""
    fed, stale = scenario.federation, scenario.federation.staleness
    models = [{k: v.clone() for k, v in setup_for(scenario).build_model().state_dict().items()}]
    states: dict[int, dict] = {}
    for t in range(1, fed.rounds + 1):
        pids = round_robin(t, fed.clients, fed.sampled_per_round)
        locals_, weights = [], []
        for pid in pids:
            lagged = pid in stale.slow_clients and stale.aggregation != "no_staleness" and t - 1 - stale.tau >= 0
            base = models[t - 1 - stale.tau] if lagged else models[t - 1]
            reply = run_client_round(scenario, pid, t, base, states.setdefault(pid, {}))
            local = reply.sent
            if lagged:
                arrival = StaleArrival(round=t, partition_id=pid, tau=stale.tau, base=base, local=local,
                                       current=models[t - 1], num_examples=reply.num_examples)
                local = by_hand(arrival, stale.aggregation, stale.dc_lambda)
            locals_.append(local)
            weights.append(float(reply.num_examples))
        total = sum(weights)
        models.append({k: sum(w * m[k].double() for w, m in zip(weights, locals_, strict=True)).div(total).float()
                       for k in locals_[0]})
    return models


@pytest.mark.parametrize("aggregation", ["direct", "downweight", "dc_asgd"])
def test_federation_equals_the_brute_force_one(tiny_raw, aggregation) -> None:
    scenario = parse_scenario(stale_raw(tiny_raw, aggregation, dc_lambda=40.0))
    out = run_federation(scenario)
    models = brute_force(scenario)
    for k, v in out.final_state.items():
        assert torch.allclose(v, models[-1][k], atol=1e-5), (aggregation, k)
    # the capture: a slow client's global_state is the w^{t-1-tau} it trained from, its update is taken against
    # it, and its lag is recorded (and reaches the attack's view); a fresh client's is the current model
    seen = {(u.round, u.partition_id): u for u in out.capture.updates}
    assert sorted(seen) == [(t, p) for t in range(1, ROUNDS + 1) for p in round_robin(t, 4, 2)]
    for (t, pid), cap in seen.items():
        lag = TAU if pid == 1 and t > TAU else 0
        assert cap.staleness == lag, (t, pid)
        for k, v in cap.global_state.items():
            assert torch.allclose(v, models[t - 1 - lag][k], atol=1e-5), (t, pid, k)
    stale_rows = {int(h["round"]): h["clients_stale"] for h in out.history if h["round"] > 0}
    assert stale_rows == {t: int(1 in round_robin(t, 4, 2) and t > TAU) for t in range(1, ROUNDS + 1)}
    slow = seen[(5, 1)]  # round 5, client 1: trained from w^2 while the current model was w^4
    assert any(not torch.allclose(models[4][k], models[2][k]) for k in models[2])  # so the two differ
    direct_round = run_client_round(scenario, 1, 5, models[5 - 1 - TAU], {})
    for k, v in slow.update.items():
        assert torch.allclose(v, direct_round.sent[k] - models[2][k], atol=1e-6), k
    view = observe(slow, setup_for(scenario).task, scenario, scenario.attacks[0], [])
    assert view.staleness == TAU


def test_the_slow_clients_lag_changes_the_run(tiny_raw) -> None:
    """The brute-force check above would pass vacuously if the lag did nothing: direct != no_staleness."""
    direct = run_federation(parse_scenario(stale_raw(tiny_raw, "direct"))).final_state
    fresh = run_federation(parse_scenario(stale_raw(tiny_raw, "no_staleness"))).final_state
    assert any(not torch.allclose(direct[k], fresh[k], atol=1e-4) for k in direct)


def test_no_staleness_is_a_plain_federation_and_runs_repeat(tiny_raw) -> None:
    raw = stale_raw(tiny_raw, "no_staleness", schedule="sampled")
    raw["federation"]["clients_per_round"] = 3
    plain = copy.deepcopy(raw)
    del plain["federation"]["staleness"]
    a, b = run_federation(parse_scenario(raw)), run_federation(parse_scenario(plain))
    assert [h["test_accuracy"] for h in a.history] == [h["test_accuracy"] for h in b.history]
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    assert all(u.staleness == 0 for u in a.capture.updates)
    assert all(h["clients_stale"] == 0 for h in a.history if h["round"] > 0) and "clients_stale" not in b.history[-1]
    again = run_federation(parse_scenario(stale_raw(tiny_raw, "dc_asgd")))
    once = run_federation(parse_scenario(stale_raw(tiny_raw, "dc_asgd")))
    assert all(torch.equal(again.final_state[k], once.final_state[k]) for k in once.final_state)


@pytest.mark.parametrize(("change", "path"), [
    ({"tau": 0}, "federation.staleness.tau"),
    ({"slow_clients": [4]}, "federation.staleness.slow_clients"),
    ({"slow_clients": None}, "federation.staleness.slow_clients"),  # neither slow_clients nor slow_class
    ({"slow_class": 2}, "federation.staleness.slow_clients"),  # both
    ({"slow_clients": None, "slow_class": 12}, "federation.staleness.slow_class"),  # digits has classes 0..9
    ({"slow_clients": None, "slow_class": 1, "num_slow": 5}, "federation.staleness.num_slow"),
    ({"aggregation": "fedbuff"}, "federation.staleness.aggregation"),
    ({"schedule": "random"}, "federation.staleness.schedule"),
    ({"dc_lambda": -1}, "federation.staleness.dc_lambda"),
    ({"typo": 1}, "federation.staleness.typo"),
    # QA finding 5, 8: accepted before, then nothing was stale / a setting was silently dropped or coerced
    ({"tau": ROUNDS}, "federation.staleness.tau"),  # tau >= rounds: no client is ever stale
    ({"tau": True}, "federation.staleness.tau"),  # a bool is not a lag
    ({"slow_clients": [1, 1]}, "federation.staleness.slow_clients"),  # a duplicate id
    ({"num_slow": 2}, "federation.staleness.num_slow"),  # ignored beside slow_clients
    ({"aggregation": "gi_conversion", "gi": {"mix": "decay"}}, "federation.staleness.gi.mix"),  # no switch to decay
])
def test_bad_staleness_is_refused_at_its_path(tiny_raw, change, path) -> None:
    raw = stale_raw(tiny_raw)
    raw["federation"]["staleness"].update(change)
    raw["federation"]["staleness"] = {k: v for k, v in raw["federation"]["staleness"].items() if v is not None}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)


def test_staleness_refuses_fedsgd_and_server_side_defenses(tiny_raw) -> None:
    raw = stale_raw(tiny_raw)
    raw["federation"]["protocol"] = "fedsgd"
    with pytest.raises(ScenarioError, match="fedavg") as err:
        parse_scenario(raw)
    assert err.value.path == "federation.staleness"
    for defense in ({"name": "central_dp", "params": {"noise_multiplier": 0.1, "clipping_norm": 1.0}},
                    {"name": "secagg"}):
        raw = stale_raw(tiny_raw)
        raw["defenses"], raw["attacks"] = [defense], []
        del raw["federation"]["clients_per_round"]  # SecAgg+ runs every client every round
        with pytest.raises(ScenarioError) as err:
            parse_scenario(raw)
        assert err.value.path == "federation.staleness", str(err.value)



@pytest.mark.slow  # ~16 s; backend equality stays in the default run (tests/test_ray_backend.py)
@pytest.mark.ray
def test_staleness_on_ray_gives_the_inprocess_numbers(tiny_raw) -> None:
    scenario = parse_scenario(stale_raw(tiny_raw, "dc_asgd"))
    local, ray = run_federation(scenario), run_federation(scenario, backend="ray")
    assert [h["test_accuracy"] for h in ray.history] == [h["test_accuracy"] for h in local.history]
    assert all(torch.equal(local.final_state[k], ray.final_state[k]) for k in local.final_state)
    assert [(u.round, u.partition_id, u.staleness) for u in ray.capture.updates] == \
        [(u.round, u.partition_id, u.staleness) for u in local.capture.updates]
    for a, b in zip(local.capture.updates, ray.capture.updates, strict=True):
        assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)


def test_class_accuracy_is_the_accuracy_on_that_class(tiny_raw) -> None:
    raw = stale_raw(tiny_raw, "direct")
    raw["evaluation"] = {"class_accuracy": list(range(10))}
    scenario = parse_scenario(raw)
    out = run_federation(scenario)
    data = setup_for(scenario).data
    model = setup_for(scenario).build_model()
    model.load_state_dict(out.final_state)
    with torch.no_grad():
        x = (data.test_x - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
        hits = model.eval()(x).argmax(1) == data.test_y
    last = out.history[-1]
    for k in range(10):
        assert last[f"test_accuracy_class{k}"] == pytest.approx(hits[data.test_y == k].float().mean().item())
    counts = [int((data.test_y == k).sum()) for k in range(10)]  # the classes' accuracies add up to the overall
    overall = sum(n * last[f"test_accuracy_class{k}"] for k, n in enumerate(counts)) / sum(counts)
    assert overall == pytest.approx(last["test_accuracy"])
    raw["evaluation"] = {"class_accuracy": [12]}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == "evaluation.class_accuracy"


def test_summary_states_the_staleness_and_the_class_accuracy(tiny_raw, tmp_path) -> None:
    import json

    from fedsim.run import run_scenario

    raw = stale_raw(tiny_raw, "downweight")
    raw["attacks"], raw["evaluation"] = [], {"class_accuracy": [3]}
    run_scenario(parse_scenario(raw), tmp_path / "run")
    text = (tmp_path / "run" / "summary.md").read_text()
    assert "- staleness: clients 1 train from the global model 2 rounds old (aggregation `downweight`" in text
    last = json.loads((tmp_path / "run" / "metrics.json").read_text())["utility"][-1]
    assert "Test accuracy on class 3 " in text and f"-> {last['test_accuracy_class3']:.3f}." in text


def test_an_attack_on_a_stale_update_records_its_staleness(tiny_raw, tmp_path) -> None:
    import json

    from fedsim.run import run_scenario

    raw = stale_raw(tiny_raw)
    raw["federation"]["rounds"] = 4  # client 1 (slow by TAU) is sent w^{t-1-TAU} from round TAU + 1 on
    raw["output"] = {"save_images": False}
    run_scenario(parse_scenario(raw), tmp_path / "run")
    attacks = json.loads((tmp_path / "run" / "metrics.json").read_text())["attacks"]
    stale = {(o["round"], o["client"]): o["staleness"] for o in attacks if not o["failed"]}
    assert {k: v for k, v in stale.items() if v} == {(3, 1): TAU}, stale  # round-robin: client 1 in rounds 1, 3
    text = (tmp_path / "run" / "summary.md").read_text()
    assert f"| 3 | 1 (update {TAU} rounds stale) |" in text and "| 1 | 1 (update" not in text
