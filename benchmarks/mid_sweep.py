"""MID's privacy-utility trade-off, measured: test accuracy vs. model-inversion leakage of the released model.

Runs ``scenarios/defenses/mid_sweep.yaml`` in-process for MID beta in {0, 1e-3, 1e-2, 1e-1}, plus the
same federation without a defense and with sample-level DP-SGD (noise multiplier sigma in {0.5, 1.0},
clipping norm 1) instead of MID, and prints one row per setting: the final global model's test
accuracy and, for GMI on that released model, the independent evaluation classifier's top-1/top-5
accuracy on the inverted images (``mi_accuracy``/``mi_top5``; chance = 1/classes), the kNN feature
distance to real held-out images of the class (lower = closer) and the target model's confidence.
MID's claim (Wang, Zhang, Jia, AAAI 2021): larger beta lowers attack accuracy at a modest
utility cost. One torch thread; about 3-10 min on a shared 2-core CPU (the first run also trains and
caches the evaluation classifier). Measured tables are in the header of ``scenarios/defenses/mid_sweep.yaml``:
there, MID lowered GMI's accuracy only together with the model's own accuracy.

    python benchmarks/mid_sweep.py [--betas 0 0.001 0.01 0.1] [--sigmas 0.5 1.0] [--rounds 4] [--attacks gmi]
                                   [--samples-per-class 2] [--lr 0.05] [--no-baseline]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fedsim.run import run_scenario
from fedsim.scenario import Scenario, parse_scenario

BASE = Path(__file__).resolve().parents[1] / "scenarios" / "defenses" / "mid_sweep.yaml"


def settings(betas: list[float], sigmas: list[float], baseline: bool = True) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, defenses block) per row: no defense, MID per beta, DP-SGD per sigma."""
    rows: list[tuple[str, list[dict[str, Any]]]] = [("none", [])] if baseline else []
    rows += [(f"mid beta={b:g}", [{"name": "mid", "params": {"beta": b, "bottleneck_dim": 32}}]) for b in betas]
    rows += [(f"dp_sgd sigma={s:g}", [{"name": "dp_sgd", "params": {"noise_multiplier": s, "max_grad_norm": 1.0}}])
             for s in sigmas]
    return rows


def row_scenario(base: dict[str, Any], defenses: list[dict[str, Any]], rounds: int, attacks: list[str],
                 samples_per_class: int, lr: float | None = None) -> Scenario:
    """One row's scenario: the base with ``defenses`` and the sweep's shared settings; rows differ only
    in ``defenses`` (``tests/test_comparisons.py`` checks it)."""
    raw = copy.deepcopy(base)
    raw["defenses"] = defenses
    raw["federation"]["rounds"] = rounds
    if lr is not None:
        raw["federation"]["local"]["lr"] = lr
    raw["backend"] = {"kind": "inprocess"}
    raw["device"] = "cpu"
    template = raw["attacks"][0]
    template["params"]["samples_per_class"] = samples_per_class
    raw["attacks"] = [{**copy.deepcopy(template), "name": name} for name in attacks]
    return parse_scenario(raw)


def run_row(base: dict[str, Any], defenses: list[dict[str, Any]], rounds: int, attacks: list[str],
            samples_per_class: int, lr: float | None = None) -> dict[str, Any]:
    scenario = row_scenario(base, defenses, rounds, attacks, samples_per_class, lr)
    start = time.perf_counter()
    result = run_scenario(scenario, write=False)
    row: dict[str, Any] = {"acc": result.history[-1].get("test_accuracy", float("nan")),
                           "seconds": time.perf_counter() - start}
    eps = [m["epsilon"] for m in result.client_metrics.get(rounds, {}).values() if "epsilon" in m]
    row["epsilon"] = max(eps) if eps else None
    for outcome in result.outcomes:
        m = outcome.metrics
        row[outcome.attack] = {"failed": outcome.failed, "mi": m.get("mi_accuracy"), "top5": m.get("mi_top5"),
                               "knn": m.get("knn_distance"), "conf": m.get("target_confidence"),
                               "eval_acc": outcome.stats.get("evaluator_accuracy")}
    return row


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="*", default=[0.0, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--sigmas", type=float, nargs="*", default=[0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--attacks", nargs="*", default=["gmi"])
    parser.add_argument("--samples-per-class", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="client learning rate (default: the scenario's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-defense row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    header = "| setting | test acc | epsilon | " + " | ".join(
        f"{a} mi_acc | {a} top5 | {a} knn | {a} conf" for a in args.attacks) + " | seconds |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    eval_acc = None
    for label, defenses in settings(args.betas, args.sigmas, not args.no_baseline):
        row = run_row(base, defenses, args.rounds, args.attacks, args.samples_per_class, args.lr)
        cells = [label, fmt(row["acc"]), fmt(row["epsilon"], 2)]
        for name in args.attacks:
            a = row.get(name, {})
            eval_acc = a.get("eval_acc") or eval_acc
            if a.get("failed"):
                cells += [f"failed: {a['failed']}", "-", "-", "-"]
            else:
                cells += [fmt(a.get("mi")), fmt(a.get("top5")), fmt(a.get("knn"), 2), fmt(a.get("conf"))]
        line = "| " + " | ".join(cells) + f" | {row['seconds']:.0f} |"
        lines.append(line)
        print(line, flush=True)
    print()
    print("\n".join(lines))
    print(f"\nevaluation classifier held-out accuracy: {fmt(eval_acc)}; chance mi_acc = 0.1 (10 classes)")


if __name__ == "__main__":
    main()
