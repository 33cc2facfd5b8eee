"""DP methods at matched epsilon: run ``benchmarks/grids/dp_frontier.yaml``, print ONE frontier table, write the report.

The grid runs each DP method (DP-SGD, DP-SAT, DP-SAM, DIFF2, central DP; whichever the grid lists) at
target epsilon 1, 3 and 8 (delta 1e-5) on the same seeds, beside a run without DP, with Inverting
Gradients on client 0's round-1 update. It is an ordinary ``fedsim bench`` grid: its cells land in
``runs/bench-dp_frontier`` (rerunning resumes after a crash), and ``fedsim report`` renders the same
table and the utility-against-epsilon figure (section "DP methods at matched ε"). The table
(:func:`fedsim.report.dp_frontier.text_table`) gives per method and target: epsilon from Opacus's
accountant and from dp_accounting (RDP, PLD), the epsilon level, test accuracy (or test loss) mean ± std
over seeds, the federation's wall time and its ratio to DP-SGD's at the same target, and the strongest
attack's PSNR. Cells run one after another in this process (one torch thread each).

The table's wall time is the whole federation's, which includes each client's one-off noise calibration
(``target_epsilon`` -> sigma by Opacus's bisection: seconds per distinct sampling rate on one core, shared by
the cell's clients and solved afresh by EVERY cell, :mod:`fedsim.run_caches`, so no method gets it free from an
earlier cell), so it is not a per-step cost. The per-round cost of each method is timed separately
afterwards: client 0's rounds 1-2 through the client's own code path (``run_client_round``) with a FIXED
noise scale, best of ``--trials``, methods alternating so drifting load hits them alike, printed as
ms/round and as a ratio to DP-SGD.

    OMP_NUM_THREADS=1 python benchmarks/dp_frontier.py [--out DIR] [--set repeats=1] [--trials 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

GRID = Path(__file__).parent / "grids" / "dp_frontier.yaml"
# fixed noise for the round-cost timing (the cost does not depend on it; a target would time the solver)
FIXED_NOISE = {"noise_multiplier": 1.0}
DIFF2_FIXED_NOISE = {"sigma1": 0.01, "sigma2": 0.01}


def _fixed_noise(raw: dict[str, Any]) -> dict[str, Any]:
    """The scenario with every ``target_epsilon`` replaced by a fixed noise scale of that defense."""
    raw = copy.deepcopy(raw)
    for spec in raw.get("defenses") or []:
        params = spec.get("params") or {}
        if params.pop("target_epsilon", None) is not None:
            params.pop("calibration", None)  # diff2: applies to a target only
            params.update(DIFF2_FIXED_NOISE if spec["name"] == "diff2" else FIXED_NOISE)
    raw["attacks"] = []
    return raw


def client_round_costs(grid: Any, trials: int, rounds: int = 2) -> dict[str, float | str]:
    """Seconds of client 0's rounds 1..``rounds`` (state carried, so DIFF2's second round is a difference
    round), best of ``trials``, per defense entry of the grid (its first cell), methods alternating within
    each trial; a method that cannot run this way maps to the reason."""
    from fedsim.bench.expand import expand_grid
    from fedsim.scenario import parse_scenario
    from fedsim.simulation.client_round import run_client_round
    from fedsim.simulation.setup import setup_for

    scenarios: dict[str, Any] = {}
    costs: dict[str, float | str] = {}
    for cell in expand_grid(grid):
        method = cell.defense.split("(", 1)[0]
        if method in scenarios or method in costs:
            continue
        try:
            scenarios[method] = parse_scenario(_fixed_noise(cell.scenario))
        except Exception as err:  # noqa: BLE001 - reported in the printed table
            costs[method] = f"{type(err).__name__}: {err}"
    best = dict.fromkeys(scenarios, float("inf"))
    for _ in range(trials + 1):  # the first pass is a warm-up
        for method, scenario in scenarios.items():
            setup = setup_for(scenario)  # data and model built outside the timed part
            state: dict = {}
            weights = setup.build_model().state_dict()
            start = time.perf_counter()
            for rnd in range(1, rounds + 1):
                run_client_round(scenario, 0, rnd, weights, state)
            best[method] = min(best[method], (time.perf_counter() - start) / rounds)
    costs.update(best)
    return costs


def print_costs(costs: dict[str, float | str], trials: int) -> None:
    ref = costs.get("dp_sgd")
    print(f"client round cost (client 0, rounds 1-2, fixed noise, best of {trials}; the frontier's time column "
          "also holds each client's one-off noise calibration):")
    for method, cost in costs.items():
        if isinstance(cost, str):
            print(f"  {method:<12} not timed: {cost}")
        else:
            ratio = f"  x{cost / ref:.2f} dp_sgd" if isinstance(ref, float) else ""
            print(f"  {method:<12} {cost * 1e3:8.1f} ms/round{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--out", type=Path, default=None, help="bench directory (default runs/bench-<grid name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="grid override key.path=value (e.g. repeats=1), repeatable")
    parser.add_argument("--no-report", action="store_true", help="print the table only")
    parser.add_argument("--trials", type=int, default=5, help="trials of the client-round timing (0: skip it)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from fedsim.bench.cli import default_bench_dir
    from fedsim.bench.grid import load_grid
    from fedsim.bench.runner import BenchProgress, run_bench
    from fedsim.isolation import command_threads
    from fedsim.report.dp_frontier import frontier_rows, text_table
    from fedsim.report.loading import load_source

    command_threads(1)
    grid = load_grid(args.grid, args.overrides)
    out = args.out or default_bench_dir(grid.name)
    start = time.perf_counter()

    def started(total: int, skipped: int) -> None:
        print(f"{grid.name}: {total} cells, {skipped} already in {out}, {total - skipped} to run", flush=True)

    def finished(record: dict) -> None:
        s = record.get("summary") or {}
        diverged = f"  DIVERGED: {s['training_diverged']}" if s.get("training_diverged") else ""
        print(f"  {record['defense']} repeat {record['repeat']}: {record['status']}"
              f" acc {s.get('test_accuracy')} eps {s.get('epsilon')} ({record['seconds']:.1f} s){diverged}", flush=True)

    result = run_bench(grid, out, "serial", BenchProgress(started, finished))
    print(f"ran {len(result.records)} cells ({result.failed} failed) in {time.perf_counter() - start:.0f} s\n")
    print(text_table(frontier_rows(load_source(result.out_dir).cells)))
    if args.trials > 0:
        print_costs(client_round_costs(grid, args.trials), args.trials)
    if not args.no_report:
        from fedsim.report.html import render_report

        print(f"report: {render_report(result.out_dir)}")


if __name__ == "__main__":
    main()
