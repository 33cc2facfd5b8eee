"""DP-SAT (fedsim.defenses.dp_sat, and DP-SAM's shared parts): the update against a plain-torch loop, the
perturbation removed exactly once, persistence across rounds, epsilon, ghost mode (DP-SAM's accounting
and its own loop: tests/test_dp_sam.py).

Expected weights come from a brute-force loop written here with torch.func.functional_call and
autograd (no Opacus): with sigma = 0 and a clipping norm no gradient reaches, DP-SGD's privatized
gradient is the batch's mean gradient, so DP-SAT is  w <- w - lr * grad L(w + rho g_prev/|g_prev|).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedsim.data import normalize
from fedsim.defenses.sharpness import Perturbation
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.seeding import torch_generator
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.training import batch_schedule

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]
NO_CLIP = 1e6  # no per-example gradient of the tiny MLP comes near it: Opacus's clip factor is exactly 1


def scenario_with(raw: dict, name: str, *, protocol: str = "fedavg", rounds: int = 1, steps: int = 3,
                  momentum: float = 0.0, **params):
    raw = copy.deepcopy(raw)
    raw["attacks"][0].update(clients="all", rounds=list(range(1, rounds + 1)))  # capture every update
    local = {"batch_size": 4, "lr": 0.5, "momentum": momentum, **({"steps": steps} if protocol == "fedavg" else {})}
    raw["federation"].update(protocol=protocol, rounds=rounds, local=local)
    raw["defenses"] = [{"name": name, "params": params}]
    return parse_scenario(raw)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class BruteForce:
    """One client's round by hand: fixed batches recomputed from the batch generator, mean cross-entropy
    gradients by autograd at any point, SGD (with momentum) written out."""

    def __init__(self, scenario, pid: int, round_num: int, global_state: dict[str, torch.Tensor]) -> None:
        setup = setup_for(scenario)
        self.inputs, self.labels = setup.client_data(pid)
        self.mean, self.std = setup.data.mean, setup.data.std
        self.model = setup.build_model().train()
        self.model.load_state_dict(global_state)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.w = [p.detach().clone() for _, p in self.model.named_parameters()]
        local = scenario.federation.local
        self.lr, self.momentum = local.lr, local.momentum
        gen = torch_generator(scenario.seed, "batches", round_num, pid)
        self.batches = batch_schedule(len(self.inputs), local, scenario.federation.protocol, gen)

    def grad(self, point: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
        params = {n: t.clone().requires_grad_(True) for n, t in zip(self.names, point, strict=True)}
        x = normalize(self.inputs[idx], self.mean, self.std)
        loss = F.cross_entropy(functional_call(self.model, params, (x,)), self.labels[idx])
        return list(torch.autograd.grad(loss, list(params.values())))

    @staticmethod
    def shift(w: list[torch.Tensor], direction: list[torch.Tensor] | None, rho: float) -> list[torch.Tensor]:
        if direction is None:
            return w
        norm = flat(direction).norm()
        return [a + rho * d / norm for a, d in zip(w, direction, strict=True)]

    def sgd(self, w, g, buf):
        buf = g if buf is None else [self.momentum * b + x for b, x in zip(buf, g, strict=True)]
        return [a - self.lr * b for a, b in zip(w, buf, strict=True)], buf

    def dp_sat(self, rho: float, variant: str = "sat", prev: list[torch.Tensor] | None = None):
        """Final weights, each step's gradient, and the cosines cos(g_{t-1}, g_t) (g at the perturbed point)."""
        w, buf, last, grads, cosines = self.w, None, None, [], []
        for idx in self.batches:
            direction = prev if variant == "sat" else last
            g = self.grad(self.shift(w, direction, rho), idx)
            if prev is not None:
                cosines.append(float(F.cosine_similarity(flat(prev), flat(g), dim=0)))
            new, buf = self.sgd(w, g, buf)
            last = [a - b for a, b in zip(w, new, strict=True)]
            w, prev = new, g
            grads.append(g)
        return w, grads, cosines

    def dp_sam(self, rho: float):
        w, buf, grads = self.w, None, []
        for idx in self.batches:
            g = self.grad(self.shift(w, self.grad(w, idx), rho), idx)
            w, buf = self.sgd(w, g, buf)
            grads.append(g)
        return w, grads


def local_weights(update) -> list[torch.Tensor]:
    """A fedavg capture holds local - global: the client's weights after its round."""
    return [update.global_state[k] + update.update[k] for k in update.update]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-4, atol: float = 1e-6) -> None:
    got, want = flat(got), flat(want)
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (got - want).abs().max()


@pytest.mark.parametrize(("variant", "momentum"), [("sat", 0.0), ("sat", 0.9), ("momentum", 0.9)])
def test_a_round_equals_the_brute_force_loop_with_no_perturbation_left_behind(tiny_raw, variant, momentum) -> None:
    """sigma 0, no clipping, fixed batches, 3 local steps: the weights the client ends with are the
    hand-written loop's, which perturbs steps 2 and 3 (by the previous gradient, or the last update with
    SGD momentum 0.9) and steps from the unperturbed weights. The same loop without the perturbation, or
    with the perturbation left in the weights, lands far away (asserted), so the comparison can fail."""
    rho = 0.5
    scenario = scenario_with(tiny_raw, "dp_sat", momentum=momentum, noise_multiplier=0.0, max_grad_norm=NO_CLIP,
                             poisson=False, rho=rho, variant=variant)
    outcome = run_federation(scenario)
    for u in outcome.capture.updates:
        brute = BruteForce(scenario, u.partition_id, 1, u.global_state)
        want, _, cosines = brute.dp_sat(rho, variant)
        got = local_weights(u)
        assert_close(got, want)
        plain, _, _ = brute.dp_sat(0.0, variant)
        assert (flat(plain) - flat(want)).norm() > 100 * (flat(got) - flat(want)).norm() + 1e-4
        metrics = outcome.capture.client_metrics[1][u.partition_id]
        assert metrics["perturbed_steps"] == 2
        assert metrics["cos_prev_grad"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-4)
        assert -1 <= metrics["cos_prev_grad"] <= 1


def test_the_broken_removal_of_the_authors_code_would_be_caught(tiny_raw) -> None:
    """The brute-force comparison above separates the right update from one that leaves +e in the weights
    after each step (what adding e per sub-batch and subtracting it once does): by a wide margin."""
    scenario = scenario_with(tiny_raw, "dp_sat", noise_multiplier=0.0, max_grad_norm=NO_CLIP, poisson=False, rho=0.5)
    u = run_federation(scenario).capture.updates[0]
    brute = BruteForce(scenario, u.partition_id, 1, u.global_state)
    w, prev, residual = brute.w, None, brute.w
    for idx in brute.batches:  # the residual variant: the step starts from w + e and keeps it
        start = brute.shift(residual, prev, 0.5)
        prev = brute.grad(start, idx)
        residual = [a - brute.lr * g for a, g in zip(start, prev, strict=True)]
    want, _, _ = brute.dp_sat(0.5)
    got = local_weights(u)
    assert (flat(residual) - flat(w)).norm() > 0
    assert (flat(residual) - flat(got)).norm() > 100 * (flat(want) - flat(got)).norm() + 1e-4


def test_the_perturbation_is_applied_once_per_step_and_removed_bit_for_bit() -> None:
    """w + e - e is not w in float32 (checked here); the perturbation restores the copy, applies once per
    step however many forward passes it sees, and refuses a second removal."""
    w = torch.tensor([1.0, 1e-8, 3.3, -7.1])
    param = torch.nn.Parameter(w.clone())
    direction = torch.tensor([0.3, 0.1, -0.2, 0.9])
    e = 0.7 * direction / direction.norm()
    assert not torch.equal((w + e) - e, w)  # the subtraction the authors' code relies on is inexact
    pert = Perturbation([param])
    assert pert.apply(direction, 0.7)
    assert not pert.apply(direction, 0.7)  # a second forward pass of the same step: no second +e
    assert torch.allclose(param.detach(), w + e)
    pert.remove()
    assert torch.equal(param.detach(), w)
    with pytest.raises(RuntimeError, match="removed twice"):
        pert.remove()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_rho_zero_is_bit_identical_to_dp_sgd(tiny_raw, mode) -> None:
    """Same seed, sigma 1, clipping active, Poisson batches, 2 rounds of 3 steps: every update and
    epsilon of dp_sat with rho 0 equals dp_sgd's exactly (same noise stream, same accountant)."""
    common = {"noise_multiplier": 1.0, "max_grad_norm": 0.1, "grad_sample_mode": mode}
    sgd = run_federation(scenario_with(tiny_raw, "dp_sgd", rounds=2, **common)).capture
    sat = run_federation(scenario_with(tiny_raw, "dp_sat", rounds=2, rho=0.0, **common)).capture
    assert len(sgd.updates) == len(sat.updates) == 8
    for a, b in zip(sgd.updates, sat.updates, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
    for r in (1, 2):
        for pid in range(4):
            assert sat.client_metrics[r][pid]["epsilon"] == sgd.client_metrics[r][pid]["epsilon"]
    moved = run_federation(scenario_with(tiny_raw, "dp_sat", rounds=2, rho=0.5, **common)).capture
    assert not torch.equal(flat(moved.updates[0].update.values()), flat(sat.updates[0].update.values()))


def test_persist_carries_the_privatized_gradient_into_the_next_round(tiny_raw) -> None:
    """fedsgd, persist: round 1's gradient is the plain one at the global model; round 2's is taken at
    w_2 + rho g_1/|g_1|, g_1 the client's round-1 sent gradient (sigma 0, no clipping), by autograd here."""
    scenario = scenario_with(tiny_raw, "dp_sat", protocol="fedsgd", rounds=2, noise_multiplier=0.0,
                             max_grad_norm=NO_CLIP, poisson=False, rho=0.5, persist=True)
    capture = run_federation(scenario).capture
    first = {u.partition_id: u for u in capture.updates if u.round == 1}
    for u in (u for u in capture.updates if u.round == 2):
        b1 = BruteForce(scenario, u.partition_id, 1, first[u.partition_id].global_state)
        g1 = b1.grad(b1.w, b1.batches[0])
        assert_close(list(first[u.partition_id].update.values()), g1)
        b2 = BruteForce(scenario, u.partition_id, 2, u.global_state)
        sent = list(u.update.values())
        assert_close(sent, b2.grad(b2.shift(b2.w, g1, 0.5), b2.batches[0]))
        assert (flat(sent) - flat(b2.grad(b2.w, b2.batches[0]))).norm() > 1e-3  # the perturbation mattered
        assert capture.client_metrics[1][u.partition_id]["perturbed_steps"] == 0
        assert math.isnan(capture.client_metrics[1][u.partition_id]["cos_prev_grad"])  # nothing to compare
        assert capture.client_metrics[2][u.partition_id]["perturbed_steps"] == 1


def test_the_perturbation_follows_the_privatized_gradient_not_the_clean_one(tiny_raw) -> None:
    """fedsgd, persist, sigma 0.01 with C 100 (no clipping, noise std 0.25 per coordinate: round 1's sent
    gradient is mostly noise). Round 2's noise is the same draw with rho 0.5 and rho 0 (same generator), so
    sent(rho) - sent(0) = grad L(w_2 + rho g~_1/|g~_1|) - grad L(w_2) with g~_1 the NOISY round-1 gradient
    the client sent, computed here; the clean round-1 gradient would give another point (asserted)."""
    runs = {rho: run_federation(scenario_with(tiny_raw, "dp_sat", protocol="fedsgd", rounds=2, noise_multiplier=0.01,
                                              max_grad_norm=100.0, poisson=False, rho=rho, persist=True))
            for rho in (0.5, 0.0)}
    scenario = scenario_with(tiny_raw, "dp_sat", protocol="fedsgd", noise_multiplier=0.01, persist=True)
    key = {rho: {(u.round, u.partition_id): u for u in run.capture.updates} for rho, run in runs.items()}
    for pid in range(4):
        noisy = list(key[0.5][(1, pid)].update.values())
        b1 = BruteForce(scenario, pid, 1, key[0.5][(1, pid)].global_state)
        clean = b1.grad(b1.w, b1.batches[0])
        assert F.cosine_similarity(flat(noisy), flat(clean), dim=0) < 0.5  # the noise dominates the direction
        u, u0 = key[0.5][(2, pid)], key[0.0][(2, pid)]
        assert all(torch.equal(u.global_state[k], u0.global_state[k]) for k in u.global_state)  # round 1 alike
        b2 = BruteForce(scenario, pid, 2, u.global_state)
        at_w = flat(b2.grad(b2.w, b2.batches[0]))
        diff = flat(u.update.values()) - flat(u0.update.values())
        want = flat(b2.grad(b2.shift(b2.w, noisy, 0.5), b2.batches[0])) - at_w
        wrong = flat(b2.grad(b2.shift(b2.w, clean, 0.5), b2.batches[0])) - at_w
        assert torch.allclose(diff, want, atol=2e-6), (diff - want).abs().max()
        assert (diff - wrong).norm() > 100 * (diff - want).norm() + 1e-4
        # cos_prev_grad: the noisy g~_1 against round 2's clipped, UN-noised gradient (at the perturbed point)
        clean2 = flat(b2.grad(b2.shift(b2.w, noisy, 0.5), b2.batches[0]))
        expected = float(F.cosine_similarity(flat(noisy), clean2, dim=0))
        noisy2 = float(F.cosine_similarity(flat(noisy), flat(u.update.values()), dim=0))
        assert runs[0.5].capture.client_metrics[2][pid]["cos_prev_grad"] == pytest.approx(expected, abs=1e-4)
        # measured |difference| 0.0066, 0.0016, 0.020, 0.0055 on clients 0-3: >= 10x the 1e-4 tolerance above
        assert abs(noisy2 - expected) > 1e-3  # what a cosine against the noisy gradient would have said


@pytest.mark.parametrize("persist", [False, True])
def test_each_round_starts_unperturbed_unless_persist(tiny_raw, persist) -> None:
    """fedavg, 2 rounds of 3 steps: round 2 perturbs 2 steps by default (its first starts from g = 0), 3 with
    persist; round 2's weights match the brute-force loop started with no previous gradient or with
    round 1's last one."""
    scenario = scenario_with(tiny_raw, "dp_sat", rounds=2, noise_multiplier=0.0, max_grad_norm=NO_CLIP,
                             poisson=False, rho=0.5, persist=persist)
    capture = run_federation(scenario).capture
    first = {u.partition_id: u for u in capture.updates if u.round == 1}
    for u in (u for u in capture.updates if u.round == 2):
        assert capture.client_metrics[2][u.partition_id]["perturbed_steps"] == (3 if persist else 2)
        b1 = BruteForce(scenario, u.partition_id, 1, first[u.partition_id].global_state)
        _, grads, _ = b1.dp_sat(0.5)
        want, _, _ = BruteForce(scenario, u.partition_id, 2, u.global_state).dp_sat(
            0.5, prev=grads[-1] if persist else None)
        assert_close(local_weights(u), want)


@pytest.mark.parametrize("name", ["dp_sat", "dp_sam"])
def test_ghost_clipping_matches_hooks(tiny_raw, name) -> None:
    """Clipping active (C 0.05), sigma 0.5, the same seed: ghost clipping's updates equal hooks' up to float
    rounding, and so do the metrics."""
    params = {"noise_multiplier": 0.5, "max_grad_norm": 0.05, "rho": 0.5}
    hooks, *others = [run_federation(scenario_with(tiny_raw, name, rounds=2, grad_sample_mode=m, **params)).capture
                      for m in ("hooks", "ghost", "bk")]  # bk: book-keeping clipping (fedsim.defenses.bk_clipping)
    for other in others:
        for a, b in zip(hooks.updates, other.updates, strict=True):
            assert_close(list(a.update.values()), list(b.update.values()), rtol=1e-4, atol=1e-6)
        for pid in range(4):
            ma, mb = ({k: v for k, v in r.client_metrics[2][pid].items() if not k.startswith("grad_sample_mode/")}
                      for r in (hooks, other))  # which mode ran is recorded, and differs
            assert ma.keys() == mb.keys()
            for k in ma:
                assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize(("params", "protocol", "path"), [
    ({"rho": -0.1}, "fedavg", "defenses[0].params.rho"),
    ({"variant": "adam"}, "fedavg", "defenses[0].params.variant"),
    ({}, "fedsgd", "defenses[0].params.persist"),
    ({"variant": "momentum", "persist": True}, "fedsgd", "defenses[0].params.variant"),
])
def test_bad_settings_are_refused_at_their_yaml_path(tiny_raw, params, protocol, path) -> None:
    with pytest.raises(ScenarioError) as err:
        scenario_with(tiny_raw, "dp_sat", protocol=protocol, noise_multiplier=1.0, **params)
    assert err.value.path == path and "\n" not in str(err.value)


@pytest.mark.parametrize("others", [[{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}],
                                    [{"name": "dp_sam", "params": {"noise_multiplier": 1.0}}],
                                    [{"name": "soteria"}]])
def test_one_opacus_defense_at_most_and_never_with_soteria(tiny_raw, others) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["defenses"] = [{"name": "dp_sat", "params": {"noise_multiplier": 1.0, "persist": True}}, *others]
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    assert err.value.path.startswith("defenses[") and "dp_sat" in str(err.value)


def persisted_raw(tiny_raw: dict, *defenses: dict) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["attacks"][0].update(clients=[0, 3], rounds=[2])
    raw["federation"]["rounds"] = 2
    raw["defenses"] = [*defenses, {"name": "dp_sat", "params": {"noise_multiplier": 1.0, "rho": 0.5, "persist": True}}]
    return raw


def test_the_persisted_direction_survives_the_secagg_client_path(tiny_raw) -> None:
    """Under SecAgg+ (the NumPyClient path, its own Context handling) round 2 is perturbed along the stored
    g~_1 as on the plain path: the same perturbed_steps, and cos_prev_grad (which reads g~_1) up to the
    SecAgg+ quantization of the round-2 global model."""
    secagg = {"name": "secagg", "params": {"num_shares": 3, "reconstruction_threshold": 2}}
    plain = run_federation(parse_scenario(persisted_raw(tiny_raw))).capture.client_metrics
    secure = run_federation(parse_scenario(persisted_raw(tiny_raw, secagg))).capture.client_metrics
    assert sum(math.isfinite(plain[2][pid]["cos_prev_grad"]) for pid in range(4)) == 3  # client 2: empty batch
    for pid in range(4):
        assert secure[2][pid]["perturbed_steps"] == plain[2][pid]["perturbed_steps"] == 1
        assert secure[2][pid]["cos_prev_grad"] == pytest.approx(plain[2][pid]["cos_prev_grad"], rel=1e-4,
                                                                     nan_ok=True)  # nan: an empty batch


@pytest.mark.slow  # ~20 s; backend equality stays in the default run (tests/test_ray_backend.py)
@pytest.mark.ray
def test_the_persisted_direction_gives_the_same_numbers_on_ray(tiny_raw) -> None:
    """The tensor state (g~ kept in each Ray node's Context) gives round 2 exactly the in-process updates."""
    scenario = parse_scenario(persisted_raw(tiny_raw))
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")
    def rows(outcome) -> list:  # nan (round 1's cos_prev_grad) as a string, so that equal means equal
        return [(r, p, sorted((k, str(v)) for k, v in m.items()))
                for r, per in sorted(outcome.capture.client_metrics.items()) for p, m in sorted(per.items())]

    assert rows(ray) == rows(local) and len(rows(local)) == 8
    for a, b in zip(local.capture.updates, ray.capture.updates, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
