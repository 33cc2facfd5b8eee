"""FZooS against FedZO at matched query counts (issue 13 'Done when'; spec algorithms-more.md §11.7).

Both methods run as real Flower federations through fedsim's runner (``fedsim.run.run_scenario``, in-process
backend, nothing written), on the authors' synthetic quadratic family shrunk for one CPU core:

* task ``quadratic``, d = 20 (authors 300), 5 clients, heterogeneity (``div``) 0.5, x0 as the task gives it;
* both: ``local_iters`` 5 Adam steps of lr 0.01 per round, global step 1, safeguard as a message (counted);
* FZooS: 10 initial queries, GP on the 150 nearest points (0 length-scale restarts; authors 20), 5 exploration
  queries per step, RFF M = 1000 (authors 10,000), refresh 50 of 200 candidates: 6 queries per step + 51 per
  refresh;
* FedZO: RGF with q = 20 orthonormal directions, mu = 0.01 (q + 2 queries per step per the authors' count);
* attacks off (this compares optimisation only).

Matched queries: the methods spend different numbers of queries per round, so each is read as a step function
"global objective at the last global point reached within Q queries" (all clients, cumulative, as the runner
counts them: ``zo_queries``), at Q = 1/4, 1/2, 3/4 and all of the smaller of the two totals. The margin is
F_FedZO - F_FZooS at that common budget (positive = FZooS lower), mean +- std over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/fzoos_vs_fedzo.py [--seeds 3] [--rounds 15] [--dim 20]

Measured (this machine, one core, 2026-11-29, ``--seeds 3 --rounds 15``, wall 80-171 s by load, a rerun gave the
identical numbers): FZooS spends 5755 queries in 15 rounds, FedZO 7880; the common budget is 5755. F(x0) = 2.502 /
2.881 / 3.215 (seeds 0 / 1 / 2); both methods reach the task's minimum (F ~ -0.0193) by the end. Margin
F_FedZO - F_FZooS, mean +- std over the 3 seeds:

    Q = 1439 (25 %): +0.434 +- 0.057  (FZooS lower in 3/3; e.g. seed 0: 0.869 vs 1.248)
    Q = 2878 (50 %): +0.276 +- 0.037  (3/3; seed 0: 0.058 vs 0.292)
    Q = 4316 (75 %): +0.030 +- 0.011  (3/3; seed 0: -0.0193 vs +0.0041)
    Q = 5755 (all):  +0.0002 +- 0.0005 (2/3: both at the minimum, a tie)

So FZooS reaches a lower global objective than FedZO at matched queries on the quadratic family over 3 seeds, by
a margin that is largest early and closes once both sit at the minimum.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import parse_scenario  # noqa: E402
from fedsim.zo.report import OBJECTIVE, QUERIES  # noqa: E402


def scenario_raw(method: str, seed: int, rounds: int, dim: int, clients: int) -> dict[str, Any]:
    """The benchmark's scenario as a raw mapping (validated by :func:`fedsim.scenario.parse_scenario`)."""
    zo: dict[str, Any] = {
        "task": {"family": "quadratic", "dim": dim, "heterogeneity": 0.5},
        "method": method, "local_iters": 5, "lr": 0.01, "safeguard": "message",
        "attacks": {"function_extraction": False, "label_set": False},
    }
    if method == "fzoos":
        zo["fzoos"] = {"n_inits": 10, "gp_points": 150, "gp_restarts": 0, "rff_features": 1000, "rff_points": 500}
    return {"name": f"bench-{method}", "seed": seed, "federation": {"protocol": "zeroth_order", "clients": clients,
                                                                   "rounds": rounds},
            "backend": {"kind": "inprocess"}, "zeroth_order": zo}


def objective_at(history: Sequence[dict[str, float]], budget: float) -> float:
    """F at the last global point reached within ``budget`` cumulative queries (rows in round order); NaN when even
    the first row (round 0: F(x0) after the initial queries) spent more."""
    best = float("nan")
    for row in history:
        if OBJECTIVE in row and QUERIES in row and row[QUERIES] <= budget:
            best = float(row[OBJECTIVE])
    return best


def run(method: str, seed: int, rounds: int, dim: int, clients: int) -> list[dict[str, float]]:
    """One federation's history rows."""
    scenario = parse_scenario(scenario_raw(method, seed, rounds, dim, clients))
    return run_scenario(scenario, write=False).history


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--clients", type=int, default=5)
    args = ap.parse_args(argv)
    fractions = (0.25, 0.5, 0.75, 1.0)
    margins: dict[float, list[float]] = {f: [] for f in fractions}
    start = time.perf_counter()
    print(f"quadratic d={args.dim}, {args.clients} clients, {args.rounds} rounds, seeds 0..{args.seeds - 1}")
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        hist = {m: run(m, seed, args.rounds, args.dim, args.clients) for m in ("fzoos", "fedzo")}
        totals = {m: h[-1][QUERIES] for m, h in hist.items()}
        common = min(totals.values())
        print(f"seed {seed}: F(x0) = {hist['fzoos'][0][OBJECTIVE]:.5f}; queries fzoos {totals['fzoos']:.0f}, "
              f"fedzo {totals['fedzo']:.0f} ({time.perf_counter() - t0:.0f} s)")
        for f in fractions:
            q = f * common
            fz, fe = objective_at(hist["fzoos"], q), objective_at(hist["fedzo"], q)
            margins[f].append(fe - fz)
            print(f"  Q = {q:7.0f}: F fzoos {fz:.5f}  F fedzo {fe:.5f}  margin {fe - fz:+.5f}")
    print("margin F_fedzo - F_fzoos at matched queries (mean +- std over seeds; > 0: FZooS lower):")
    for f in fractions:
        m = margins[f]
        sd = statistics.stdev(m) if len(m) > 1 else 0.0
        wins = sum(v > 0 for v in m)
        print(f"  {f:.0%} of the common budget: {statistics.fmean(m):+.5f} +- {sd:.5f} "
              f"(FZooS lower in {wins}/{len(m)})")
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
