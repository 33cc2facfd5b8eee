"""The DP frontier (utility against epsilon per DP method): its table logic on hand-built cells, the report
section on a real tiny bench (dp_sgd at two target epsilons), and central DP's target epsilon.

Expected means and standard deviations are computed here with numpy from the hand-written inputs, and
epsilons from Google's dp_accounting (an accountant the code under test does not solve with).
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import TINY

from fedsim.bench.grid import load_grid
from fedsim.bench.runner import run_bench
from fedsim.errors import ScenarioError
from fedsim.report.dp_frontier import frontier_rows, has_frontier, method_of, target_of, text_table
from fedsim.report.html import render_report
from fedsim.report.loading import Cell
from fedsim.scenario import parse_scenario

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def cell(defense: str, repeat: int, attack: str = "ig", params: dict | None = None, status: str = "ok",
         error: str | None = None, **summary: Any) -> Cell:
    return Cell(f"{defense}-{attack}-{repeat}", attack, defense, params or {}, repeat, 100 + repeat, status, error,
                1.0, None, summary)


def swept(label: str, eps: float) -> tuple[str, dict]:
    """The defense label and params fedsim.bench.expand gives a cell of a target_epsilon sweep."""
    return f"{label}(target_epsilon={eps})", {"defenses.0.params.target_epsilon": eps}


ACC = {1: [0.50, 0.56, 0.47], 3: [0.80, 0.74, 0.77]}  # dp_sgd's accuracy per target and repeat
SECONDS = {1: [4.0, 5.0, 6.0], 3: [5.0, 5.0, 8.0]}
EPS = {1: [0.99, 0.995, 0.992], 3: [2.99, 2.998, 2.991]}  # per repeat (max over clients already)
# two attacks: dlg has the single highest PSNR (30) but the lower mean over repeats (30, 5, 5: 13.3 < 15)
PSNR = {"ig": [15.0, 14.0, 16.0], "dlg": [30.0, 5.0, 5.0]}


def hand_cells() -> list[Cell]:
    cells = []
    for eps in (1, 3):
        label, params = swept("dp_sgd", eps)
        for r in range(3):
            for attack in ("ig", "dlg"):  # one federation per repeat: same utility, time and epsilon
                cells.append(cell(label, r, attack, params, test_accuracy=ACC[eps][r], federation_s=SECONDS[eps][r],
                                  epsilon=EPS[eps][r], epsilon_dp_accounting_rdp=EPS[eps][r] + 0.001,
                                  epsilon_dp_accounting_pld=EPS[eps][r] - 0.2, epsilon_level="sample",
                                  psnr_mean=PSNR[attack][r] - eps))
    label, params = swept("dp_sat", 3)
    cells += [cell(label, r, "ig", params, test_accuracy=a, federation_s=6.0, epsilon=2.995, epsilon_level="sample",
                   psnr_mean=12.0) for r, a in enumerate((0.81, 0.79))]
    cells.append(cell(label, 2, "ig", params, status="failed", error="RuntimeError: boom"))
    # dp_sam misses its target (achieved 5.9 for 3): it must say so, not vanish
    label, params = swept("dp_sam", 3)
    cells += [cell(label, r, "ig", params, test_accuracy=0.6, epsilon=5.9, epsilon_level="sample") for r in range(3)]
    label, params = swept("diff2", 1)
    cells += [cell(label, r, "ig", params, status="failed", error="IncompatibleDefenseError: no sigma")
              for r in range(3)]
    label, params = swept("diff2", 3)  # central noise: released epsilon 3, nothing against the server
    cells += [cell(label, r, "ig", params, test_accuracy=0.7, epsilon=2.999, epsilon_level="sample",
                   epsilon_vs_server=None) for r in range(3)]  # inf, as cells.jsonl stores it (strict JSON)
    # central DP: client-level, low utility at a low epsilon; ranked only against client-level rows
    for eps in (1, 8):
        label, params = swept("central_dp", eps)
        cells += [cell(label, r, "ig", params, test_accuracy=0.1 + 0.01 * eps, epsilon=eps * 0.999,
                       epsilon_level="client") for r in range(3)]
    cells += [cell("none", r, "ig", test_accuracy=0.9, federation_s=1.0, psnr_mean=20.0) for r in range(3)]
    return cells


def by_key(rows) -> dict:
    return {(r.method, r.target): r for r in rows}


def test_rows_average_over_repeats_take_the_strongest_attack_and_the_worst_epsilon() -> None:
    rows = by_key(frontier_rows(hand_cells()))
    for eps in (1, 3):
        r = rows[("dp_sgd", eps)]
        assert r.utility.mean == pytest.approx(np.mean(ACC[eps]))
        assert r.utility.std == pytest.approx(np.std(ACC[eps], ddof=1))  # sample std over the 3 seeds, not 6 cells
        assert r.utility.n == 3 and r.repeats == 3
        assert r.seconds.mean == pytest.approx(np.mean(SECONDS[eps]))
        assert r.seconds.std == pytest.approx(np.std(SECONDS[eps], ddof=1))
        assert r.epsilon == max(EPS[eps]) and r.epsilon_rdp == max(EPS[eps]) + 0.001
        assert r.epsilon_pld == pytest.approx(max(EPS[eps]) - 0.2)
        assert r.level == "sample" and r.matched and r.note == ""
        assert r.attack == "ig"  # highest MEAN over repeats, not the single highest cell (dlg's 30 dB)
        assert r.psnr.mean == pytest.approx(np.mean(PSNR["ig"]) - eps)
        assert r.psnr.std == pytest.approx(np.std(PSNR["ig"], ddof=1))
        assert r.time_ratio == pytest.approx(1.0)
    sat = rows[("dp_sat", 3)]
    assert sat.repeats == 2 and sat.failed == 1 and "1 failed cell" in sat.note
    assert sat.utility.mean == pytest.approx(0.80) and sat.utility.std == pytest.approx(np.std([0.81, 0.79], ddof=1))
    assert sat.time_ratio == pytest.approx(6.0 / np.mean(SECONDS[3]))
    plain = rows[("none", None)]
    assert not plain.dp and plain.epsilon is None and plain.time_ratio is None and plain.utility.mean == 0.9


def test_rows_that_miss_their_target_or_all_failed_stay_in_the_table_and_say_why() -> None:
    rows = by_key(frontier_rows(hand_cells()))
    sam = rows[("dp_sam", 3)]
    assert sam.matched is False and "not matched" in sam.note and "5.9" in sam.note
    diff2 = rows[("diff2", 1)]
    assert diff2.utility is None and diff2.repeats == 0 and diff2.failed == 3
    assert "every cell failed" in diff2.note and "no sigma" in diff2.note
    text = text_table(frontier_rows(hand_cells()))
    lines = text.splitlines()
    assert len([line for line in lines if line.split()[:2] == ["diff2", "1"]]) == 1 and "not matched" in text
    # one line per (method, target), ordered by method then target
    order = [line.split()[0] + " " + line.split()[1] for line in lines[2:-1]]
    assert order == ["central_dp 1", "central_dp 8", "diff2 1", "diff2 3", "dp_sam 3", "dp_sat 3", "dp_sgd 1",
                     "dp_sgd 3", "none -"]


def test_epsilon_against_the_server_is_reported_or_follows_where_the_noise_is_added() -> None:
    rows = by_key(frontier_rows(hand_cells()))
    assert rows[("dp_sgd", 3)].epsilon_vs_server == max(EPS[3])  # clients noise before sending
    assert rows[("central_dp", 8)].epsilon_vs_server == float("inf")  # the server sees raw updates
    assert rows[("diff2", 3)].epsilon_vs_server == float("inf") and rows[("diff2", 3)].epsilon == 2.999
    assert rows[("none", None)].epsilon_vs_server is None


def test_pareto_front_is_taken_within_one_epsilon_level() -> None:
    rows = by_key(frontier_rows(hand_cells()))
    # sample level: dp_sgd@1 (lowest epsilon) and dp_sat@3 (best accuracy at 3) are on the front; dp_sgd@3
    # (same epsilon, lower accuracy than dp_sat) and dp_sam (more epsilon, less accuracy) are dominated
    assert rows[("dp_sgd", 1)].pareto and rows[("dp_sat", 3)].pareto
    assert not rows[("dp_sgd", 3)].pareto and not rows[("dp_sam", 3)].pareto and not rows[("diff2", 3)].pareto
    # client level: its own front, though every sample-level row dominates it numerically
    assert rows[("central_dp", 1)].pareto and rows[("central_dp", 8)].pareto
    assert not rows[("none", None)].pareto and not rows[("diff2", 1)].pareto


def test_regression_utility_is_test_loss_and_lower_is_better() -> None:
    cells = []
    for eps, losses in ((1, [0.9, 1.1]), (3, [0.5, 0.7])):
        label, params = swept("dp_sgd", eps)
        cells += [cell(label, r, "ig", params, test_accuracy=None, test_loss=v, epsilon=eps, epsilon_level="sample")
                  for r, v in enumerate(losses)]
    label, params = swept("diff2", 3)
    cells += [cell(label, r, "ig", params, test_loss=0.8, epsilon=3.0, epsilon_level="sample") for r in range(2)]
    rows = by_key(frontier_rows(cells))
    assert rows[("dp_sgd", 3)].utility_key == "test_loss"
    assert rows[("dp_sgd", 3)].utility.mean == pytest.approx(0.6)
    assert rows[("dp_sgd", 1)].pareto and rows[("dp_sgd", 3)].pareto and not rows[("diff2", 3)].pareto
    assert "test loss (lower is better)" in text_table(list(rows.values()))


def test_frontier_needs_one_dp_method_at_two_epsilons() -> None:
    assert has_frontier(frontier_rows(hand_cells()))
    one = [c for c in hand_cells() if c.defense.startswith(("dp_sgd(target_epsilon=3)", "dp_sat", "none"))]
    assert not has_frontier(frontier_rows(one))  # dp_sgd and dp_sat at one epsilon each
    assert not has_frontier(frontier_rows([c for c in hand_cells() if c.defense == "none"]))


def test_method_and_target_come_from_the_grid_label_and_sweep() -> None:
    label, params = swept("dp(sat)", 3)  # a label with parentheses of its own keeps them
    assert method_of(cell(label, 0, params=params)) == "dp(sat)" and target_of(cell(label, 0, params=params)) == 3.0
    two = {"defenses.0.params.target_epsilon": 8, "defenses.0.params.rho": 0.05}
    assert method_of(cell("dp_sat(target_epsilon=8, rho=0.05)", 0, params=two)) == "dp_sat"
    assert target_of(cell("dp_sgd", 0)) is None


def test_the_shipped_frontier_grid_matches_every_method_at_each_target_on_the_same_seeds() -> None:
    from fedsim.bench.expand import expand_grid
    from fedsim.teaching.comparisons import grid_comparisons

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "dp_frontier.yaml"
    cells = expand_grid(load_grid(path))
    dp = {"dp_sgd", "dp_sat", "dp_sam", "diff2", "dp_gd", "central_dp"}
    targets: dict[str, set] = {}
    for c in cells:
        specs = c.scenario["defenses"]
        if specs:
            targets.setdefault(method_of(c), set()).add((specs[0]["params"]["target_epsilon"], c.seed))
    assert set(targets) == dp
    seeds = {c.seed for c in cells}
    assert len(seeds) >= 3 and all(t == {(e, s) for e in (1, 3, 8) for s in seeds} for t in targets.values())
    # each DP cell differs from a defense-free cell of its repeat only in the defense (DIFF2's protocol change
    # has its own defense-free entry)
    bad = {c.name: c.unexplained() for c in grid_comparisons(path) if c.unexplained()}
    assert not bad, bad


# -- the report, on a real tiny bench -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> Path:
    """none + dp_sgd at target epsilon 2 and 8 on the tiny digits federation (2 FedSGD rounds), one repeat."""
    base = copy.deepcopy(TINY)
    base["output"] = {"save_images": False}
    grid = {"name": "dpf", "base": base, "attacks": ["inverting_gradients"],
            "defenses": ["none", {"label": "dp_sgd",
                                  "defenses": [{"name": "dp_sgd", "params": {"target_epsilon": 2}}]}],
            "sweep": {"defenses.0.params.target_epsilon": {"values": [2, 8], "defenses": ["dp_sgd"]}}}
    root = tmp_path_factory.mktemp("dpf")
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    result = run_bench(load_grid(root / "grid.yaml"), root / "bench", executor="serial")
    assert result.failed == 0
    return result.out_dir


def test_report_shows_the_dp_frontier_for_dp_sgd_at_two_epsilons(tiny_bench: Path, tmp_path: Path) -> None:
    from fedsim.privacy.accounting import dp_accounting_epsilon

    out = render_report(tiny_bench, tmp_path / "r.html")
    doc = out.read_text()
    assert 'id="dp-frontier"' in doc and "DP methods at matched" in doc
    assert (tmp_path / "r" / "dp_frontier.png").is_file()
    table = csv.DictReader((tmp_path / "r" / "dp_frontier.csv").open())
    rows = {r["method"] + "@" + r["target_epsilon"]: r for r in table}
    assert set(rows) == {"dp_sgd@2.0", "dp_sgd@8.0", "none@"}
    records = {r["defense"]: r for r in map(json.loads, (tiny_bench / "cells.jsonl").read_text().splitlines())}
    for target in (2.0, 8.0):
        row = rows[f"dp_sgd@{target}"]
        cell_dir = tiny_bench / records[f"dp_sgd(target_epsilon={target:g})"]["run_dir"]
        metrics = json.loads((cell_dir / "metrics.json").read_text())
        # every client's history re-accounted independently: the row's epsilon is the max, at the target
        worst = 0.0
        for pid in {p for per in metrics["client_metrics"].values() for p in per}:
            history = [(m["noise_multiplier"], m["sample_rate"], int(m["steps"]))
                       for _, per in sorted(metrics["client_metrics"].items(), key=lambda kv: int(kv[0]))
                       for p, m in per.items() if p == pid]
            worst = max(worst, dp_accounting_epsilon(history, 1e-5, "rdp"))
        assert float(row["epsilon_dp_accounting_rdp"]) == pytest.approx(worst, rel=1e-6)
        assert float(row["epsilon"]) == pytest.approx(target, rel=0.02) and row["note"] == ""
        assert float(row["utility_mean"]) == pytest.approx(metrics["utility"][-1]["test_accuracy"])
        assert float(row["federation_s_mean"]) == pytest.approx(metrics["timing"]["federation_s"])
    assert rows["none@"]["epsilon"] == "" and rows["none@"]["utility_mean"] != ""


def test_report_omits_the_dp_frontier_with_one_epsilon(tiny_bench: Path, tmp_path: Path) -> None:
    bench = tmp_path / "one"
    shutil.copytree(tiny_bench, bench)
    records = [json.loads(line) for line in (bench / "cells.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in records if "target_epsilon=8" not in r["defense"]]
    assert len(kept) == len(records) - 1
    (bench / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    doc = render_report(bench, tmp_path / "r.html").read_text()
    assert 'id="dp-frontier"' not in doc and not (tmp_path / "r" / "dp_frontier.png").exists()
    assert 'id="leaderboard"' in doc  # the rest of the report is unchanged


# -- central DP's target epsilon ---------------------------------------------------------------------


def central_raw(**params: Any) -> dict:
    raw = copy.deepcopy(TINY)
    raw["federation"].update(rounds=3, clients_per_round=1, protocol="fedavg", local={"batch_size": 4, "lr": 0.2,
                                                                                       "steps": 1})
    raw["defenses"] = [{"name": "central_dp", "params": params}]
    return raw


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_central_dp_target_epsilon_solves_sigma_for_the_planned_rounds(target: float) -> None:
    from fedsim.defenses.central_dp import CentralDP
    from fedsim.privacy.accounting import dp_accounting_epsilon
    from fedsim.simulation.strategies import FedSimFedAvg

    scenario = parse_scenario(central_raw(target_epsilon=target))
    defense = CentralDP.from_spec(scenario.defenses[0], scenario)
    wrapped = defense.wrap_strategy(FedSimFedAvg(scenario, {}))
    sigma = wrapped.noise_multiplier  # what Flower's wrapper adds noise with
    spent = dp_accounting_epsilon([(sigma, 0.25, 3)], 1e-5, "rdp")  # 3 rounds at q = 1 / 4, another library
    assert target * 0.99 <= spent <= target * 1.001
    assert dp_accounting_epsilon([(sigma * 0.98, 0.25, 3)], 1e-5, "rdp") > target  # not a needlessly large sigma
    last = defense.server_round_metrics(3)
    assert last["noise_multiplier"] == sigma and last["epsilon"] == pytest.approx(spent, rel=0.01)


def test_central_dp_refuses_noise_multiplier_and_target_epsilon_together() -> None:
    with pytest.raises(ScenarioError, match="not both") as err:
        parse_scenario(central_raw(target_epsilon=3.0, noise_multiplier=1.0))
    assert err.value.path == "defenses[0]"
