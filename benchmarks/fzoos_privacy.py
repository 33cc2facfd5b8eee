"""What FZooS's surrogate message gives a curious server, with and without each defense (issue 13 item 5; spec
algorithms-more.md §11.6).

FZooS federations run through fedsim's runner (``fedsim.run.run_scenario``, in-process backend, nothing written)
on two task families:

* ``metric``: f_i(x) = 1 - macro-F1 of a small scikit-learn MLP (trained once on the bundled digits' first half)
  whose last two layers are perturbed by x (d = 584, box +-0.2), on client i's private, class-skewed part of the
  other half (5 clients, 2 own classes each, class portion 0.9): extraction and label-set inference;
* ``quadratic``: the authors' synthetic family, d = 20, 5 clients, div 0.5: extraction of a smooth f_i.

Settings shrunk for one CPU core: 4 rounds, 3 local steps, RFF M = 1000, 0 GP restarts, safeguard as a message,
attacks in every round (200 held-out points per box). Defenses (``zeroth_order.defenses``, one at a time): Gaussian
noise std 0.1 on the min-max-normalised values before the fit (``y_noise``) or on each weight nu_i (``nu_noise``;
weights are ~0.5 in magnitude here), ridge 0.01 instead of the min-norm fit, SecAgg (masked nu_i; the server keeps
only their sum).

Per defense setting and seed it records, averaged over the attacked rounds (:func:`fedsim.zo.report.attack_summary`):
extraction R^2 and RMSE of the server's rebuilt mu_i in the box the client fitted (x_{r+1} +- max(r_i, 0.01)), R^2 in
the 10x wider box, the aggregate surrogate's R^2 / RMSE as the baseline the server keeps under SecAgg, label-set
accuracy from mu_i's slope along "raise logit k" and from the phase-1 step, beside the exact chance of a random guess
of the same size; and the final global objective (the defense's price in utility).

    OMP_NUM_THREADS=1 python benchmarks/fzoos_privacy.py [--seeds 3] [--rounds 4] [--tasks metric quadratic]

Measured (this machine, one core, 2026-11-29, ``--seeds 3``, wall 172-186 s, a rerun gave the identical table;
seeds 0-2, mean +- std over seeds):

    metric        R2 fit box   RMSE          RMSE aggr.  labels (grad mu)  labels (step)  chance  final F
    none          -18.9+-16.5  0.007+-0.001  0.078       0.737+-0.029      0.673+-0.015   0.680   0.270+-0.006
    y_noise 0.1   -126+-195    0.009+-0.001  0.077       0.710+-0.020      0.687+-0.021   0.680   0.265+-0.011
    nu_noise 0.1  -159+-259    0.007+-0.001  0.078       0.743+-0.042      0.670+-0.010   0.680   0.270+-0.006
    ridge 0.01    -0.50+-0.32  0.003+-0.001  0.075       0.753+-0.023      0.727+-0.025   0.680   0.268+-0.012
    secagg        -2.9e12      1115+-140     0.078       0.700+-0.010      0.673+-0.015   0.680   0.270+-0.006

    quadratic     R2 fit box    R2 wide       RMSE          RMSE aggr.  final F
    none          1.000+-0.000  0.963+-0.006  0.0004        0.085       1.304+-0.178
    y_noise 0.1   -335+-84      -3.2e4        0.395+-0.092  0.220       2.214+-0.327
    nu_noise 0.1  -29.4+-7.4    0.658+-0.085  0.087+-0.022  0.090       1.303+-0.178
    ridge 0.01    0.688+-0.047  0.408+-0.074  0.012         0.086       1.303+-0.177
    secagg        -5.8e9        -6.1e7        1261+-299     0.085       1.304+-0.178

Reading: on the smooth quadratic the server's mu_i is an exact local copy (R^2 1.000) and good 10x farther out; on
the piecewise-constant metric it gets the level (RMSE 0.007 vs 0.078 for the aggregate) but R^2 < 0 (f_i hardly
varies in the box), and the class guess beats chance by a small margin (0.737 vs 0.680, above chance in each seed).
y_noise breaks the copy and the optimisation (final F 2.21 vs 1.30); nu_noise blurs only the fit box; ridge improves
the copy; SecAgg reduces the per-client reading to noise at no utility cost (x_i and the safeguard values stay clear).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import parse_scenario  # noqa: E402
from fedsim.zo.report import OBJECTIVE, attack_summary  # noqa: E402

DEFENSES: dict[str, dict[str, Any]] = {
    "none": {},
    "y_noise 0.1": {"y_noise": 0.1},
    "nu_noise 0.1": {"nu_noise": 0.1},
    "ridge 0.01": {"ridge": 0.01},
    "secagg": {"secagg": True},
}
TASKS: dict[str, dict[str, Any]] = {
    "metric": {"family": "metric", "dataset": "digits", "class_portion": 0.9, "metric": "f1"},
    "quadratic": {"family": "quadratic", "dim": 20, "heterogeneity": 0.5},
}
COLUMNS = (("zo_extraction_r2_mean", "R2 fit box"), ("zo_extraction_r2_wide_mean", "R2 wide"),
           ("zo_extraction_r2_global_mean", "R2 aggregate"), ("zo_extraction_rmse_mean", "RMSE"),
           ("zo_extraction_rmse_global_mean", "RMSE aggregate"), ("zo_label_set_accuracy_mean", "labels (grad mu)"),
           ("zo_label_set_step_accuracy_mean", "labels (step)"), ("zo_label_set_chance", "chance"),
           ("final_F", "final F"))


def scenario_raw(defenses: dict[str, Any], seed: int, rounds: int, local_iters: int,
                 task: str = "metric") -> dict[str, Any]:
    """The benchmark's scenario as a raw mapping (validated by :func:`fedsim.scenario.parse_scenario`)."""
    zo: dict[str, Any] = {
        "task": dict(TASKS[task]),
        "method": "fzoos", "local_iters": local_iters, "lr": 0.01, "safeguard": "message",
        "fzoos": {"n_inits": 10, "gp_points": 150, "gp_restarts": 0, "rff_features": 1000, "rff_points": 500},
        "attacks": {"function_extraction": True, "label_set": task == "metric", "every": 1, "heldout_points": 200},
    }
    if defenses:
        zo["defenses"] = dict(defenses)
    return {"name": "bench-fzoos-privacy", "seed": seed,
            "federation": {"protocol": "zeroth_order", "clients": 5, "rounds": rounds},
            "backend": {"kind": "inprocess"}, "zeroth_order": zo}


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}" if abs(mean) < 1e4 else f"{mean:.3g} +- {sd:.2g}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-iters", type=int, default=3)
    ap.add_argument("--defenses", nargs="*", default=list(DEFENSES), choices=list(DEFENSES))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for task in args.tasks:
        _table(task, args)
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


def _table(task: str, args: argparse.Namespace) -> None:
    table: dict[str, dict[str, list[float]]] = {}
    for label in args.defenses:
        cells: dict[str, list[float]] = {k: [] for k, _ in COLUMNS}
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            scenario = parse_scenario(scenario_raw(DEFENSES[label], seed, args.rounds, args.local_iters, task))
            history = run_scenario(scenario, write=False).history
            summary = attack_summary(history)
            summary["final_F"] = float(history[-1][OBJECTIVE])
            for k, _ in COLUMNS:
                cells[k].append(float(summary.get(k, float("nan"))))
            print(f"{task} {label:>12} seed {seed}: " + ", ".join(f"{t} {summary.get(k, float('nan')):.3g}"
                                                         for k, t in COLUMNS)
                  + f" (F(x0) {history[0][OBJECTIVE]:.4f}; {time.perf_counter() - t0:.0f} s)", flush=True)
        table[label] = cells
    what = "digits, 5 clients x 2 classes" if task == "metric" else "d = 20, 5 clients"
    print(f"\n{task} task ({what}), {args.rounds} rounds, seeds 0..{args.seeds - 1}; "
          "mean +- std over seeds of the per-run mean over attacked rounds")
    print("| defense | " + " | ".join(t for _, t in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label, cells in table.items():
        print(f"| {label} | " + " | ".join(_fmt(cells[k]) for k, _ in COLUMNS) + " |")
    print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
