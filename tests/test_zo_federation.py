"""The zeroth-order protocol as a Flower federation (issue 13 item 4): scenario wiring, the message flow, SecAgg masks,
the safeguard, determinism and the Ray backend (fedsim/zo/{validate,server_app,client_app,capture,run}.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError, SimulationError
from fedsim.scenario import parse_scenario
from fedsim.simulation.inprocess import InProcessGrid
from fedsim.zo.api import FederatedObjective
from fedsim.zo.client_app import secagg_masks
from fedsim.zo.run import run_zo_federation, run_zo_scenario

TINY = {
    "name": "zo-tiny", "seed": 0,
    "federation": {"protocol": "zeroth_order", "clients": 3, "rounds": 2},
    "backend": {"kind": "inprocess"},
    "zeroth_order": {
        "task": {"family": "quadratic", "dim": 10}, "method": "fzoos", "local_iters": 2,
        "fzoos": {"n_inits": 12, "gp_points": 30, "gp_restarts": 0, "explore_candidates": 20, "explore_top": 2,
                  "rff_features": 200, "rff_points": 60, "refresh_candidates": 20, "refresh_top": 5},
        "attacks": {"heldout_points": 20},
    },
}


def tiny(**zo: object) -> dict:
    raw = copy.deepcopy(TINY)
    raw["zeroth_order"].update(zo)
    if raw["zeroth_order"]["method"] != "fzoos":  # the fzoos settings are refused under a baseline
        del raw["zeroth_order"]["fzoos"]
    return raw


# ------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize(("change", "path"), [
    (lambda r: r.pop("zeroth_order"), "zeroth_order"),
    (lambda r: r["federation"].update(protocol="fedavg"), "zeroth_order"),
    (lambda r: r.update(defenses=[{"name": "dp_sgd"}]), "defenses"),
    (lambda r: r.update(attacks=[{"name": "dlg"}]), "attacks"),
    (lambda r: r.update(data={"dataset": "mnist-mini"}), "data"),
    (lambda r: r.update(model={"name": "mlp"}), "model"),
    (lambda r: r.update(evaluation={"every": 2}), "evaluation"),
    (lambda r: r["federation"].update(clients_per_round=2), "federation.clients_per_round"),
    (lambda r: r["federation"].update(staleness={"tau": 2, "slow_clients": [0]}), "federation.staleness"),
    (lambda r: r["federation"].update(server_lr=0.5), "federation.server_lr"),
    (lambda r: r["zeroth_order"]["task"].update(class_portion=0.5), "zeroth_order.task.class_portion"),
    (lambda r: r["zeroth_order"].update(method="fedzo", defenses={"secagg": True}) or r["zeroth_order"].pop("fzoos"),
     "zeroth_order.defenses"),
    (lambda r: r["zeroth_order"].update(attacks={"label_set": True}), "zeroth_order.attacks.label_set"),
    (lambda r: r["zeroth_order"].update(method="fedzo"), "zeroth_order.fzoos"),
    (lambda r: r["zeroth_order"].update(rgf={"directions": 5}), "zeroth_order.rgf"),
    (lambda r: r["zeroth_order"].update(prox_mu=0.5), "zeroth_order.prox_mu"),
    (lambda r: r["zeroth_order"].update(method="fedzo", fzoos=None, attacks={"function_extraction": True})
     or r["zeroth_order"].pop("fzoos"), "zeroth_order.attacks.function_extraction"),
])
def test_validation_refuses_with_the_yaml_path(change, path) -> None:
    raw = tiny()
    parse_scenario(copy.deepcopy(raw))  # the unchanged scenario is accepted: the change alone is refused
    change(raw)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path == path, str(err.value)
    assert "\n" not in str(err.value)


def test_cli_validate_accepts_the_shipped_scenario_and_refuses_in_one_line(tmp_path) -> None:
    result = CliRunner().invoke(app, ["validate", "scenarios/protocols/fzoos.yaml"])
    assert result.exit_code == 0, result.output
    assert "ok (fzoos: fzoos on the quadratic task)" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny(), "attacks": [{"name": "dlg"}]}))
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "attacks: not used under federation.protocol zeroth_order" \
        in result.output


# ------------------------------------------------------------------------------------------- fakes

def bowl(dim: int, centers: list[float]) -> FederatedObjective:
    """f_i(x) = |x - c_i|^2 (independent of the task families): F's minimum is at the weighted mean of c_i."""
    def client(c: float):
        return lambda xs: ((xs.reshape(-1, dim).to(torch.float64) - c) ** 2).sum(1)
    n = len(centers)
    return FederatedObjective("bowl", dim, torch.full((dim,), 0.5, dtype=torch.float64),
                              [client(c) for c in centers], [1.0 / n] * n)


class StepClient:
    """A stand-in for ZOClient: ``train`` moves x by ``shift`` (no query), ``values`` queries f_i; it fails in
    round ``fail_round`` on client ``fail_pid``."""

    shift, fail_pid, fail_round = 0.1, -1, -1

    def __init__(self, f, spec, *, seed, partition_id, dim, state) -> None:  # noqa: ANN001
        self.f, self.pid, self._state = f, partition_id, state

    def values(self, xs: torch.Tensor) -> torch.Tensor:
        return self.f(xs)

    def train(self, round_num: int, x: torch.Tensor, payload: dict) -> tuple[torch.Tensor, dict]:
        if self.pid == self.fail_pid and round_num == self.fail_round:
            raise RuntimeError("sensor offline")
        self._state["rounds"] = self._state.get("rounds", "") + str(round_num)
        return x + self.shift, {}

    def state(self) -> dict:
        return self._state


def fake_run(raw: dict, objective: FederatedObjective, client=StepClient):  # noqa: ANN001
    scenario = parse_scenario(raw)
    return run_zo_federation(scenario, objective, objective_fn=lambda *a: objective, client_cls=client)


# ------------------------------------------------------------------------------------------- safeguard, failures

def test_safeguard_keeps_x_r_when_the_clients_values_rise() -> None:
    """x0 = 0.5 and every c_i = 0.5: the bowl's minimum; any step raises every f_i, so the safeguard keeps x0."""
    objective = bowl(4, [0.5, 0.5, 0.5])
    raw = tiny(method="fedzo", task={"family": "quadratic", "dim": 4}, rgf={"directions": 4})
    kept = fake_run(raw, objective)
    assert all(torch.equal(v.x_next, objective.x0) for v in kept.views)
    assert [t.safeguard_kept for t in kept.traffic[1:]] == [True, True]
    assert kept.views[1].values == {p: pytest.approx(4 * 0.1**2) for p in range(3)}  # f_i(candidate), sent
    raw["zeroth_order"]["safeguard"] = "off"  # the same steps without the safeguard: F rises
    moved = fake_run(raw, objective)
    assert torch.allclose(moved.views[-1].x_next, objective.x0 + 0.2)
    assert objective.value(moved.views[-1].x_next) > objective.value(objective.x0)
    # no safeguard, no value message at all (round 0 sent f_i(x0) before: the server needs none)
    assert [t.queries for t in moved.traffic] == [0, 0, 0]
    assert [t.uplink for t in moved.traffic][0] == 0 and moved.views[0].values == {}


def test_safeguard_moves_when_the_values_fall() -> None:
    objective = bowl(4, [0.9, 0.9, 0.9])
    out = fake_run(tiny(method="fedzo", task={"family": "quadratic", "dim": 4}, rgf={"directions": 4}), objective)
    assert torch.allclose(out.views[-1].x_next, objective.x0 + 0.2)
    assert [t.safeguard_kept for t in out.traffic[1:]] == [False, False]
    assert [t.queries for t in out.traffic] == [3, 3, 3]  # f_i(x0), then one safeguard value per client per round


def test_a_failing_client_stops_the_run_naming_it() -> None:
    class Failing(StepClient):
        fail_pid, fail_round = 2, 2

    with pytest.raises(SimulationError, match=r"client 2 failed in round 2 \(train\): RuntimeError: sensor offline"):
        fake_run(tiny(method="fedzo", task={"family": "quadratic", "dim": 4}, rgf={"directions": 4}),
                 bowl(4, [0.9] * 3), Failing)


# ------------------------------------------------------------------------------------------- the real protocol

@pytest.fixture
def spy(monkeypatch):
    """Every message type the server sends, in order (wraps the in-process Grid)."""
    sent: list[str] = []
    original = InProcessGrid.send_and_receive

    def recording(self, messages, *, timeout=None):  # noqa: ANN001
        messages = list(messages)
        types = {m.metadata.message_type for m in messages}
        assert len(types) == 1
        sent.append(types.pop())
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", recording)
    return sent


def _fzoos(raw: dict):
    scenario = parse_scenario(raw)
    from fedsim.zo.tasks import build_objective

    objective = build_objective(scenario.zeroth_order, scenario.federation.clients, scenario.seed)
    return scenario, objective, run_zo_federation(scenario, objective)


def test_fzoos_message_flow_and_the_servers_view(spy) -> None:
    scenario, objective, out = _fzoos(tiny())
    assert spy == ["query", "query.safeguard"] + ["train", "query.safeguard", "train.refresh"] * 2
    assert [v.round for v in out.views] == [0, 1, 2]
    for view in out.views[1:]:
        assert sorted(view.local) == sorted(view.surrogates) == sorted(view.values) == [0, 1, 2]
        assert all(x.shape == (10,) for x in view.local.values())
        assert all(m.nu.shape == (200,) and m.y_max >= m.y_min for m in view.surrogates.values())
        assert view.aggregate is not None and view.aggregate.nu.shape == (200,)
        # the refresh radius is the spec's r_i = mean|x_{r+1} - x_{i,r}| / 2, from what the server holds
        for p, x_i in view.local.items():
            assert view.radius[p] == pytest.approx(float((view.x_next - x_i).abs().mean()) / 2)
    # uplink per client per round: x_i (d) + 1 safeguard value + nu (M) + y_min, y_max
    assert [t.uplink for t in out.traffic[1:]] == [3 * (10 + 1 + 200 + 2)] * 2
    # round 0: each client's f_i(x0) and its n_inits (12) initial queries around x0 (ZOClient.initialize)
    assert out.traffic[0].queries == 3 * (1 + 12)
    assert all(t.queries > 0 for t in out.traffic)


@pytest.mark.parametrize(("method", "second"), [("fedzo", []), ("fedprox", []), ("scaffold1", ["train.control"]),
                                                ("scaffold2", [])])
def test_baselines_run_their_message_flow(spy, method, second) -> None:
    _, objective, out = _fzoos(tiny(method=method, local_iters=2, rgf={"directions": 3}))
    assert spy == ["query", "query.safeguard"] + (["train", "query.safeguard"] + second) * 2
    assert all(not v.surrogates and v.aggregate is None for v in out.views)
    if method == "scaffold2":  # c_i travels in the phase-1 reply (d floats more uplink)
        assert all(v.payload[p]["c_i"].shape == (10,) for v in out.views[1:] for p in range(3))
    assert [t.uplink for t in out.traffic[1:]] == [3 * (10 + 1 + (10 if method != "fedzo" and method != "fedprox"
                                                                  else 0))] * 2
    assert objective.value(out.views[-1].x_next) <= objective.value(objective.x0)  # the safeguard never goes up


def test_secagg_masks_hide_each_nu_but_keep_the_sum() -> None:
    masks = torch.stack([secagg_masks(7, 1, p, 4, 50) for p in range(4)])
    assert masks.abs().min() > 0 and masks.sum(0).abs().max() < 1e-9
    _, _, plain = _fzoos(tiny())
    _, _, masked = _fzoos(tiny(defenses={"secagg": True}))
    for a, b in zip(plain.views[1:], masked.views[1:], strict=True):
        for p in a.surrogates:  # what the server received from each client: nothing like its weights
            assert (a.surrogates[p].nu - b.surrogates[p].nu).abs().max() > 10.0
        assert torch.allclose(a.aggregate.nu, b.aggregate.nu, rtol=0, atol=1e-8)
        assert a.aggregate.offset == pytest.approx(b.aggregate.offset, abs=1e-9)
        assert torch.allclose(a.x_next, b.x_next, rtol=0, atol=1e-9)
    # the server knows its own protocol: its views say the messages are shares, so the attacks read them as such
    assert all(v.secagg for v in masked.views[1:]) and not any(v.secagg for v in plain.views)


def test_the_server_side_never_names_the_objective() -> None:
    """The ServerApp and the capture see only replies: they never name the objective, a task, or the truth."""
    from pathlib import Path

    from helpers import referenced_names

    root = Path(__file__).resolve().parents[1] / "fedsim" / "zo"
    for name in ("server_app.py", "capture.py"):
        names = referenced_names(root / name)
        assert not names & {"FederatedObjective", "objective", "fedsim.zo.tasks", "build_objective", "objective_for",
                            "truth", "value", "clients"}, name
    assert "build_objective" in referenced_names(root / "client_app.py") or \
        "objective_for" in referenced_names(root / "client_app.py")  # the collector does see such names


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_fzoos_run_is_deterministic_in_the_seed_and_writes_the_run_dir(tmp_path) -> None:
    first = run_zo_scenario(parse_scenario(tiny()), tmp_path / "a")
    again = run_zo_scenario(parse_scenario(tiny()), write=False)
    other = run_zo_scenario(parse_scenario({**tiny(), "seed": 1}), write=False)
    assert _rows(first.history) == _rows(again.history)
    assert _rows(first.history) != _rows(other.history)
    rows = first.history
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["zo_queries"] == sum(x["zo_queries_round"] for x in rows[: i + 1]) for i, r in enumerate(rows))
    assert rows[-1]["zo_extraction_r2_mean"] == rows[-1]["zo_extraction_r2_mean"]  # attacked: a number, not NaN
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["zeroth_order"]["method"] == "fzoos" and len(metrics["utility"]) == 3
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "task: quadratic, d = 10; method fzoos" in summary and "## Zeroth-order optimisation" in summary
    assert "cifar10" not in summary and "convnet" not in summary  # the NN defaults the block never used
    html = (tmp_path / "a" / "report.html").read_text()
    assert 'id="zeroth-order"' in html and "cifar10" not in html


@pytest.mark.ray
# ~20 s since issue 15: the ZO runner's numbers are thread- and process-independent (test_zo_tasks, test_zo_core)
@pytest.mark.slow
@pytest.mark.parametrize("safeguard", ["message", "off"])  # off: query.init
def test_ray_gives_the_inprocess_numbers(safeguard: str) -> None:
    scenario = parse_scenario(tiny(safeguard=safeguard))
    local = run_zo_scenario(scenario, write=False, backend="inprocess")
    ray = run_zo_scenario(scenario, write=False, backend="ray")
    assert _rows(ray.history) == _rows(local.history)


def test_a_non_finite_message_stops_the_run_naming_client_round_and_message() -> None:
    """A NaN point (or an inf value) from one client would otherwise be averaged in and stall the run silently
    (QA: nu_noise 1e300 gave 'inf' strings in numeric columns and a stuck safeguard)."""
    class NaNStep(StepClient):
        def train(self, round_num: int, x: torch.Tensor, payload: dict) -> tuple[torch.Tensor, dict]:
            out, extra = super().train(round_num, x, payload)
            return (out * float("nan") if self.pid == 1 and round_num == 2 else out), extra

    raw = tiny(method="fedzo", task={"family": "quadratic", "dim": 4}, rgf={"directions": 4})
    with pytest.raises(SimulationError, match=r"^client 1 sent a non-finite local point x_i in round 2 "):
        fake_run(raw, bowl(4, [0.9] * 3), NaNStep)

    class InfValue(StepClient):
        def values(self, xs: torch.Tensor) -> torch.Tensor:
            return self.f(xs) * (float("inf") if self.pid == 2 else 1.0)

    with pytest.raises(SimulationError, match=r"^client 2 sent a non-finite value f_i\(x0\) in round 0 "):
        fake_run(raw, bowl(4, [0.9] * 3), InfValue)
