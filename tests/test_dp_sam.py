"""DP-SAM (fedsim.defenses.dp_sam): two private queries per step on one Poisson batch, accounted together.

epsilon against Google's dp_accounting composing the event itself (a Poisson sample released through
two Gaussians), and the update against the plain-torch loop of tests/test_dp_sat.py.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import rdp
from test_dp_sat import BruteForce, assert_close, flat, local_weights, scenario_with

from fedsim.privacy.summary import privacy_summary
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for

NO_CLIP = 1e6  # no per-example gradient of the tiny MLP comes near it: no clipping
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]

def rdp_reference(events: list, delta: float = 1e-5) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


def poisson_gaussians(q: float, inner: list[float], steps: int):
    """``steps`` Poisson samples of rate q, each released through Gaussians of the given sigmas."""
    one = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in inner])
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, one), steps)


def test_epsilon_dp_sat_is_dp_sgds_and_dp_sam_is_the_sampled_pair(tiny_raw) -> None:
    """2 rounds of 3 Poisson steps at q = 4/n, sigma 1. DP-SAT: exactly DP-SGD's epsilon, which is
    dp_accounting's RDP of 6 subsampled Gaussians. DP-SAM: two Gaussian queries on each of the 6 Poisson
    samples, dp_accounting's RDP of that event (its own composition, not fedsim's sigma/sqrt 2) within 1%;
    more than DP-SGD's, and more than counting 12 independently subsampled steps would claim."""
    runs = {name: run_federation(scenario_with(tiny_raw, name, rounds=2, noise_multiplier=1.0, **rho))
            for name, rho in (("dp_sgd", {}), ("dp_sat", {"rho": 0.1}), ("dp_sam", {"rho": 0.1}))}
    scenario = scenario_with(tiny_raw, "dp_sgd", noise_multiplier=1.0)
    for pid in range(4):
        q = 4 / len(setup_for(scenario).client_data(pid)[0])
        eps = {name: run.capture.client_metrics[2][pid]["epsilon"] for name, run in runs.items()}
        sgd = rdp_reference([poisson_gaussians(q, [1.0], 6)])
        assert eps["dp_sat"] == eps["dp_sgd"] == pytest.approx(sgd, rel=0.01)
        pair = rdp_reference([poisson_gaussians(q, [1.0, 1.0], 6)])
        assert eps["dp_sam"] == pytest.approx(pair, rel=0.01)
        naive = rdp_reference([poisson_gaussians(q, [1.0], 12)])
        assert eps["dp_sam"] > 1.5 * naive and eps["dp_sam"] > eps["dp_sgd"]
        sam = runs["dp_sam"].capture.client_metrics[2][pid]
        assert (sam["steps"], sam["queries"], sam["query_noise_multiplier"]) == (3, 6, 1.0)
    # the run's privacy block re-accounts each client's reported history with dp_accounting
    block = privacy_summary([], runs["dp_sam"].capture.client_metrics)["dp_sgd"]
    for pid, client in block["clients"].items():
        q = 4 / len(setup_for(scenario).client_data(int(pid))[0])
        pair = rdp_reference([poisson_gaussians(q, [1.0, 1.0], 6)])
        assert client["epsilon_dp_accounting_rdp"] == pytest.approx(pair, rel=0.01)


def test_dp_sam_target_epsilon_is_met_with_sqrt2_times_the_noise_per_query(tiny_raw) -> None:
    """target_epsilon 3 over 2 rounds: DP-SAM's final epsilon is within Opacus's bisection tolerance of the
    target, and each of its queries carries sqrt(2) x the sigma DP-SGD solves for the same target."""
    target = {"target_epsilon": 3.0}
    sgd = run_federation(scenario_with(tiny_raw, "dp_sgd", rounds=2, **target)).capture.client_metrics[2]
    sam = run_federation(scenario_with(tiny_raw, "dp_sam", rounds=2, **target)).capture.client_metrics[2]
    for pid in range(4):
        assert 3.0 - 0.03 <= sam[pid]["epsilon"] <= 3.0 + 1e-9
        assert sam[pid]["query_noise_multiplier"] == pytest.approx(math.sqrt(2) * sgd[pid]["noise_multiplier"])


@pytest.mark.parametrize("protocol", ["fedavg", "fedsgd"])
def test_dp_sam_equals_the_brute_force_two_query_step(tiny_raw, protocol) -> None:
    """sigma 0, no clipping: each step descends along grad L(w + rho g/|g|), g = grad L(w) on the same batch
    (fedsgd sends that gradient; fedavg ends at the loop's weights)."""
    scenario = scenario_with(tiny_raw, "dp_sam", protocol=protocol, noise_multiplier=0.0, max_grad_norm=NO_CLIP,
                             poisson=False, rho=0.5)
    for u in run_federation(scenario).capture.updates:
        brute = BruteForce(scenario, u.partition_id, 1, u.global_state)
        want, grads = brute.dp_sam(0.5)
        if protocol == "fedsgd":
            assert_close(list(u.update.values()), grads[0])
        else:
            assert_close(local_weights(u), want)
            plain, _, _ = brute.dp_sat(0.0)
            assert (flat(plain) - flat(want)).norm() > 1e-3
