"""Where DP-SGD noise breaks each text attack: a sweep of the noise multiplier sigma with a clip-only control.

"Both attacks collapse under DP-SGD epsilon 8" (scenarios/text/dp_sgd.yaml) says nothing about epsilon unless weaker
noise leaves the attacks working. This runs the text quickstart setting (scenarios/text/quickstart.yaml: gpt width
128, depth 2, kjv verses of T 16 tokens, 4 clients, fedsgd) for one round through the real defense path (dp_sgd, ghost
clipping, C 1) with a FIXED batch of 4 verses (``poisson: false``: B (T-1) = 60 < width 128, DAGER's rank condition)
and attacks client 0's update with token_set, strict dager (``span_tol`` 1e-4) and adaptive dager (``adaptive:
true``: ranks candidates by span residual, an attacker that knows noise is present; attacks/dager.py).

sigma runs over 0 (clipping only: the control), 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1 and the sigmas the RDP accountant
gives for epsilon 3 and 8 at dp_sgd.yaml's sampling rate (client 0: q = 4/214) and 3 steps (3 fedsgd rounds), delta
1e-5.
Epsilon is printed from both accountants, Opacus RDP and dp_accounting PLD, for (sigma, q, 3 steps) with Poisson
sampling (the scenario's setting; the sweep's fixed batch is only there to keep B constant). Per sigma and attack:
exact-sequence rate, ROUGE-1/2 means (sequence attacks) and bag precision/recall (the distinct recovered token ids
against the batch's; token_set's own metric), averaged over ``--seeds`` (one batch each). The break point of an
attack is the smallest sigma where its headline metric (token_set: bag recall; dager: exact rate) falls below 0.5.

Usage: ``python benchmarks/text_dp_leakage.py [--seeds 0 1]`` (about 20 s per sigma and seed on 1 CPU thread).
Measured (2 seeds, OMP_NUM_THREADS=1): see docs/text.md's DP paragraph.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import yaml

from fedsim.defenses.dp_sgd import solve_noise_multiplier
from fedsim.privacy.accounting import dp_accounting_epsilon, opacus_epsilon
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario
from fedsim.simulation.setup import setup_for

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "text" / "quickstart.yaml"
FIXED_SIGMAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
ATTACKS = (("token_set", {}), ("dager", {}), ("dager adaptive", {"adaptive": True}))
DELTA, STEPS, CLIP = 1e-5, 3, 1.0


def scenario_raw(sigma: float, seed: int) -> dict:
    """The quickstart, one round, DP-SGD (ghost, C 1, noise ``sigma``, fixed batch), the three attacks on client 0."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw.update(seed=seed)
    raw["federation"]["rounds"] = 1
    raw["defenses"] = [{"name": "dp_sgd", "params": {"noise_multiplier": sigma, "max_grad_norm": CLIP,
                                                     "poisson": False, "grad_sample_mode": "ghost"}}]
    raw["attacks"] = [{"name": name.split()[0], "rounds": [1], "clients": [0], "params": params}
                      for name, params in ATTACKS]
    return raw


def pld_epsilon(history: list[tuple[float, float, int]]) -> float:
    """dp_accounting's PLD epsilon; nan where its discretisation overflows (sigma <= 1e-4: epsilon in the
    thousands, where RDP already says there is no meaningful guarantee)."""
    try:
        return dp_accounting_epsilon(history, DELTA, "pld")
    except OverflowError:
        return math.nan


def bag_pr(found: set[int], truth: set[int]) -> tuple[float, float]:
    """Precision and recall of the recovered distinct token ids against the batch's."""
    hit = len(found & truth)
    return (hit / len(found) if found else 0.0), hit / len(truth)


def scores(outcome) -> dict[str, float]:  # noqa: ANN001 - an AttackOutcome
    """exact, rouge1, rouge2 (nan for a bag-only attack), bag P/R; raises if the attack did not run."""
    if outcome.failed is not None:
        raise RuntimeError(f"{outcome.attack} failed: {outcome.failed}")
    truth = {int(t) for t in outcome.truth_tokens.flatten()}
    m = outcome.metrics
    if outcome.tokens is None:  # token_set: a bag only
        found = {int(t) for t in outcome.token_set} if outcome.token_set is not None else set()
        nan = float("nan")
        p, r = bag_pr(found, truth)
        return {"exact": nan, "rouge1": nan, "rouge2": nan, "bag_p": p, "bag_r": r}
    p, r = bag_pr({int(t) for t in outcome.tokens.flatten() if int(t) >= 0}, truth)
    return {"exact": m["exact_seq_rate"], "rouge1": m["rouge1_mean"], "rouge2": m["rouge2_mean"], "bag_p": p,
            "bag_r": r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    n = len(setup_for(parse_scenario(scenario_raw(0.0, 0))).client_data(0)[0])
    q = 4 / n
    named = {f"eps {e:g}": solve_noise_multiplier(e, DELTA, q, STEPS, "rdp") for e in (8.0, 3.0)}
    sigmas = [(f"{s:g}" if s else "0 (clip only)", s) for s in FIXED_SIGMAS]
    sigmas += [(f"{s:.4f} ({name})", s) for name, s in sorted(named.items(), key=lambda kv: kv[1])]
    print(f"client 0: n {n}, q {q:.5f}, {STEPS} steps, delta {DELTA:g}; batch 4 x T 16, width 128, C {CLIP:g}")
    print(f"{'sigma':>22} {'eps RDP':>9} {'eps PLD':>9}  {'attack':<15} {'exact':>6} {'R-1':>5} {'R-2':>5} "
          f"{'bag P':>6} {'bag R':>6}")
    broke: dict[str, str] = {}
    for label, sigma in sigmas:
        hist = [(sigma, q, STEPS)]
        rdp = opacus_epsilon(hist, DELTA, "rdp") if sigma > 0 else math.inf
        pld = pld_epsilon(hist) if sigma > 0 else math.inf
        per_attack: dict[str, list[dict[str, float]]] = {name: [] for name, _ in ATTACKS}
        for seed in args.seeds:
            result = run_scenario(parse_scenario(scenario_raw(sigma, seed)), write=False)
            for (name, _), outcome in zip(ATTACKS, result.outcomes, strict=True):
                per_attack[name].append(scores(outcome))
        for i, (name, rows) in enumerate(per_attack.items()):
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            eps = f"{rdp:>9.3g} {pld:>9.3g}" if i == 0 else " " * 19
            print(f"{label if i == 0 else '':>22} {eps}  {name:<15} {mean['exact']:>6.2f} {mean['rouge1']:>5.2f} "
                  f"{mean['rouge2']:>5.2f} {mean['bag_p']:>6.2f} {mean['bag_r']:>6.2f}", flush=True)
            head = mean["bag_r"] if name == "token_set" else mean["exact"]
            if head < 0.5 and name not in broke:
                broke[name] = label
    for name, _ in ATTACKS:
        print(f"break point (headline < 0.5) of {name}: sigma {broke.get(name, 'none in the sweep')}")


if __name__ == "__main__":
    main()
