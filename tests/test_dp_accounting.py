"""Every epsilon fedsim prints, cross-checked against an independent accountant.

Expected values come from Google's ``dp_accounting`` built here in the test (its own events, its default
orders), or from the closed form of the Gaussian mechanism (RDP of order a: a T / (2 sigma^2), converted
with Balle et al. 2020 Prop. 12 and minimized by brute force over a fine grid of orders), never from the
function under test. RDP vs RDP must agree within 1 %; PLD is tighter than RDP and is checked against
dp_accounting's own PLD at 10x finer discretization.
"""

from __future__ import annotations

import json
import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedsim.bench.store import summarize_run
from fedsim.privacy.accounting import dp_accounting_epsilon, opacus_epsilon
from fedsim.report.loading import summarize_metrics
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario
from fedsim.simulation.setup import setup_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]
DELTA = 1e-5


def reference(history: list[tuple[float, float, int]], delta: float = DELTA, method: str = "rdp") -> float:
    """dp_accounting, built independently: Poisson-sampled Gaussian per step (plain Gaussian at q = 1)."""
    events = []
    for sigma, q, steps in history:
        one = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            one = dp_accounting.PoissonSampledDpEvent(q, one)
        events.append(dp_accounting.SelfComposedDpEvent(one, steps))
    acc = rdp.RdpAccountant() if method == "rdp" else pld.PLDAccountant(value_discretization_interval=1e-4)
    absl = logging.getLogger("absl")  # RDP logs each fractional order it skips (q = 1/2): quiet, then restored
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dp_accounting.ComposedDpEvent(events))
        return acc.get_epsilon(delta)
    finally:
        absl.setLevel(level)


def gaussian_closed_form(sigma: float, releases: int, delta: float = DELTA) -> float:
    """Full-batch Gaussian: min over a of  a T/(2 sigma^2) + log(1 - 1/a) - log(delta a)/(a - 1)."""
    a = np.linspace(1.02, 400.0, 400_000)
    return float(np.min(a * releases / (2 * sigma**2) + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)))


@pytest.mark.parametrize(("sigma", "q", "steps"), [
    (1.0, 1.0, 1), (0.7, 1.0, 3), (1.0, 0.5, 3), (1.0, 4 / 360, 6), (1.1, 0.01, 1000), (0.8, 0.2, 30),
])
def test_both_accountants_agree_with_an_independent_dp_accounting_and_pld_is_tighter(sigma, q, steps) -> None:
    expected = reference([(sigma, q, steps)])
    assert opacus_epsilon([(sigma, q, steps)], DELTA) == pytest.approx(expected, rel=0.01)
    assert dp_accounting_epsilon([(sigma, q, steps)], DELTA, "rdp") == pytest.approx(expected, rel=0.01)
    tight = reference([(sigma, q, steps)], method="pld")
    mine = dp_accounting_epsilon([(sigma, q, steps)], DELTA, "pld")
    assert tight <= mine <= tight * 1.01 and mine <= expected  # pessimistic rounding, still below RDP
    if q == 1.0:
        assert opacus_epsilon([(sigma, q, steps)], DELTA) == pytest.approx(gaussian_closed_form(sigma, steps),
                                                                             rel=0.01)


def test_pld_of_a_tiny_sigma_stays_cheap() -> None:
    """sigma 1e-3 (epsilon ~ 5.5e5): on a fixed 1e-3 grid PLD needed ~18 GB; its grid now scales with epsilon."""
    bound = reference([(1e-3, 1.0, 1)])
    assert 0.8 * bound < dp_accounting_epsilon([(1e-3, 1.0, 1)], DELTA, "pld") <= bound


@pytest.mark.parametrize("sigma", [1e-4, 1e-6])
def test_pld_of_a_subsampled_tiny_sigma_is_bounded_not_an_overflow(sigma: float) -> None:
    """q 4/214, 3 steps (scenarios/text/dp_sgd.yaml's client 0): the scaled PLD grid overflowed exp() (an
    OverflowError ended the run in its privacy summary); RDP's epsilon is a valid upper bound on PLD's."""
    history = [(sigma, 4 / 214, 3)]
    eps = dp_accounting_epsilon(history, DELTA, "pld")
    assert math.isfinite(eps) and 0 < eps <= reference(history) * 1.01


def test_a_mixed_history_composes_every_step_and_edge_cases() -> None:
    history = [(1.0, 0.1, 5), (1.0, 0.1, 5), (2.0, 0.05, 20)]  # two entries of one kind, then another
    expected = reference([(1.0, 0.1, 10), (2.0, 0.05, 20)])
    assert opacus_epsilon(history, DELTA) == pytest.approx(expected, rel=0.01)
    assert dp_accounting_epsilon(history, DELTA) == pytest.approx(expected, rel=0.01)
    assert opacus_epsilon([], DELTA) == 0.0 == dp_accounting_epsilon([], DELTA, "pld")
    assert math.isinf(opacus_epsilon([(0.0, 0.5, 1)], DELTA))
    assert math.isinf(dp_accounting_epsilon([(0.0, 1, 1)], DELTA))
    with pytest.raises(ValueError, match="delta"):
        opacus_epsilon([(1.0, 0.5, 1)], 0.0)


def dp_run(tmp_path, tiny_raw, defense: dict, **federation):
    """A run with the given DP defense on 4 Dirichlet (unequal) clients, written to disk."""
    tiny_raw["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.5}  # 596 / 192 / 398 / 251 examples
    tiny_raw["federation"].update(protocol="fedavg", local={"batch_size": 4, "lr": 0.2, "steps": 2}, **federation)
    tiny_raw["attacks"] = []
    tiny_raw["defenses"] = [defense]
    scenario = parse_scenario(tiny_raw)
    result = run_scenario(scenario, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    return scenario, result, metrics


def test_dp_sgd_per_client_epsilon_over_the_whole_run_with_partial_participation(tmp_path, tiny_raw) -> None:
    """4 unequal clients, 2 a round, 4 rounds, 2 Poisson steps of expected size 4 a round, sigma 1.

    A client composes only the rounds it trained: its epsilon is dp_accounting's for (1, 4/n, 2 x rounds
    trained), reported by every summary as the max over clients over the whole run, not over the last
    round's participants (measured: clients trained 1, 1, 2, 4 rounds; epsilon 0.88, 1.22, 1.00, 1.20, and
    the last round's two clients are not the run's most-spent one)."""
    scenario, result, metrics = dp_run(tmp_path, tiny_raw, {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}},
                                       rounds=4, clients_per_round=2)
    setup = setup_for(scenario)
    per_round = result.client_metrics
    trained = {p: [r for r in sorted(per_round) if p in per_round[r]] for p in range(4)}
    assert any(len(rs) < 4 for rs in trained.values())  # partial participation happened
    expected = {}
    for pid, rounds in trained.items():
        if not rounds:
            continue
        q = 4 / len(setup.partitions[pid])
        expected[pid] = reference([(1.0, q, 2 * len(rounds))])
        reported = per_round[rounds[-1]][pid]
        assert reported["epsilon"] == pytest.approx(expected[pid], rel=0.01)  # Opacus RDP vs dp_accounting RDP
        mine = metrics["privacy"]["dp_sgd"]["clients"][str(pid)]
        assert mine["rounds_trained"] == len(rounds)
        assert mine["epsilon_dp_accounting_rdp"] == pytest.approx(expected[pid], rel=0.01)
        tight = reference([(1.0, q, 2 * len(rounds))], method="pld")
        assert tight <= mine["epsilon_dp_accounting_pld"] <= tight * 1.01
    values = sorted(expected.values())
    last = per_round[max(per_round)]
    assert max(values) > max(m["epsilon"] for m in last.values())  # the old "last round" figure was too low
    for summary in (summarize_run(result), summarize_run(metrics), summarize_metrics(metrics)):
        assert summary["epsilon"] == pytest.approx(max(values), rel=0.01)
        assert summary["epsilon_min"] == pytest.approx(min(values), rel=0.01)
        assert summary["epsilon_median"] == pytest.approx(float(np.median(values)), rel=0.01)
        assert summary["epsilon_dp_accounting_rdp"] == pytest.approx(max(values), rel=0.01)
        assert summary["epsilon_dp_accounting_pld"] < summary["epsilon_dp_accounting_rdp"]
        assert summary["epsilon_level"] == "sample"
    html = (tmp_path / "run" / "report.html").read_text()
    assert "dp_accounting" in html and "PLD" in html
    assert "dp_accounting" in (tmp_path / "run" / "summary.md").read_text()


def test_central_dp_epsilon_with_client_sampling_matches_dp_accounting(tmp_path, tiny_raw) -> None:
    """2 of 4 clients a round (q = 1/2), sigma 1, 3 rounds: epsilon after each round is dp_accounting's
    Poisson-sampled Gaussian composed r times (the approximation of fixed-size sampling, stated)."""
    _, result, metrics = dp_run(tmp_path, tiny_raw, {"name": "central_dp", "params": {"noise_multiplier": 1.0}},
                                rounds=3, clients_per_round=2)
    rows = [row for row in result.history if row["round"] >= 1]  # round 0: the initial model, nothing released
    assert len(rows) == 3
    for row in rows:
        assert row["epsilon"] == pytest.approx(reference([(1.0, 0.5, int(row["round"]))]), rel=0.01)
    central = metrics["privacy"]["central_dp"]
    assert central["epsilon_dp_accounting_rdp"] == pytest.approx(reference([(1.0, 0.5, 3)]), rel=0.01)
    tight = reference([(1.0, 0.5, 3)], method="pld")
    assert tight <= central["epsilon_dp_accounting_pld"] <= tight * 1.01
    assert central["aggregation"] == "uniform" and "approximation" in central["sampling"]
    assert summarize_metrics(metrics)["epsilon"] == summarize_run(result)["epsilon"] == central["epsilon"]
    assert summarize_metrics(metrics)["epsilon_level"] == "client"


def test_central_dp_full_participation_matches_the_gaussian_closed_form(tiny_raw) -> None:
    from fedsim.defenses.central_dp import central_dp_epsilon

    tiny_raw["federation"].update(rounds=3, protocol="fedavg")
    tiny_raw["defenses"] = [{"name": "central_dp", "params": {"noise_multiplier": 0.7}}]
    eps = central_dp_epsilon(parse_scenario(tiny_raw))
    for r, e in enumerate(eps, start=1):
        assert e == pytest.approx(gaussian_closed_form(0.7, r), rel=0.01)
    assert eps[-1] == pytest.approx(13.95, abs=0.01)  # the digits example at its effective sigma 0.70


def test_every_summary_reports_each_clients_whole_run_not_the_last_rounds_participants() -> None:
    """Client 0 spent 5.0 in round 1 and never trained again; rounds 2-3 had clients at 1.0-1.2: the run's
    epsilon is 5.0 (it was reported as 1.2), with the distribution over clients beside it."""
    metrics = {
        "utility": [{"round": 1}, {"round": 2}, {"round": 3}], "attacks": [],
        "client_metrics": {"1": {"0": {"epsilon": 5.0}}, "2": {"1": {"epsilon": 1.0}},
                           "3": {"2": {"epsilon": 1.0}, "3": {"epsilon": 1.2}}},
    }
    bench, report = summarize_run(metrics), summarize_metrics(metrics)
    for summary in (bench, report):
        assert summary["epsilon"] == 5.0 and summary["epsilon_min"] == 1.0
        assert summary["epsilon_median"] == pytest.approx(1.1)
    assert {k: v for k, v in bench.items() if k.startswith("epsilon")} == \
        {k: v for k, v in report.items() if k.startswith("epsilon")}
