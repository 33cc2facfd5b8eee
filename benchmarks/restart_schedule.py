"""Restart scheduling: Inverting Gradients with K restarts x N iterations, ``schedule: full`` against ``halving``.

For each model (LeNet(Zhu) and ConvNet at 32x32, untrained, fedsgd, batch 1, a real cifar10-mini image per seed;
model seed = image index = seed) it runs fedsim's ``inverting_gradients`` three ways with 1 torch thread:

* ``full``: every restart runs the N iterations (today's default; what breaching does);
* ``halving``: successive halving over the restarts (``fedsim.attacks.schedule``; ``--eta``, ``--first-rung``),
  ranked by the gradient distance only;
* ``halving+batched``: the same with the rungs as one vmapped computation (``batched: true``).

and prints, per model and seed, the wall time, PSNR (as fedsim scores it: ``score_reconstruction``, Hungarian-
matched, no LPIPS) and the iterations spent, then per model the mean PSNR and the wall-time ratio to ``full``
(sum over seeds). The issue's target (breaching as the reference, fedsim full ~0.85x breaching at 8 x 2000 on
LeNet): wall <= 0.25x breaching, i.e. about <= 0.29x fedsim-full, at a PSNR no lower than full's.

    python benchmarks/restart_schedule.py [--iterations 2000] [--restarts 8] [--seeds 0 1 2]
                                          [--models lenet convnet] [--eta 2] [--first-rung 0.125]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.attacks.inverting_gradients import InvertingGradients  # noqa: E402
from fedsim.attacks.schedule import ScheduleSpec, planned_iterations, rungs  # noqa: E402
from fedsim.data import load_dataset, normalize  # noqa: E402
from fedsim.metrics.leakage import score_reconstruction  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec  # noqa: E402
from fedsim.threat import ClientUpdate, GroundTruth, TaskInfo  # noqa: E402

MODELS = {"lenet": ModelSpec(name="lenet"), "convnet": ModelSpec(name="convnet", width=32)}


def victim(bundle, name: str, seed: int) -> tuple[ClientUpdate, GroundTruth]:  # noqa: ANN001
    """The fedsgd update of cifar10-mini train image ``seed`` on an untrained ``name`` (model seed ``seed``)."""
    spec = MODELS[name]
    model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=seed).train()
    x, y = bundle.train_x[[seed]], bundle.train_y[[seed]]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(normalize(x, bundle.mean, bundle.std)), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    update = {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                    spec.model_dump(), "fedsgd")
    return ClientUpdate(0, 0, task, state, update, 1), GroundTruth(0, 0, x, y)


def run(update: ClientUpdate, truth: GroundTruth, iterations: int, restarts: int, schedule: dict,
        batched: bool) -> tuple[float, float, float]:
    """(wall seconds, PSNR dB, iterations spent) of one IG reconstruction."""
    attack = InvertingGradients(InvertingGradients.Params(schedule=schedule, batched=batched), Knowledge(),
                                Budget(iterations=iterations, restarts=restarts), torch.device("cpu"), 0)
    start = time.perf_counter()
    rec = attack.reconstruct(update)
    wall = time.perf_counter() - start
    if rec.failed is not None:
        raise SystemExit(f"reconstruction failed: {rec.failed}")
    psnr = float(score_reconstruction(rec, truth, lpips=False)["psnr_mean"])
    return wall, psnr, rec.stats["iterations_spent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eta", type=float, default=2.0)
    parser.add_argument("--first-rung", type=float, default=1 / 8)
    parser.add_argument("--more", nargs="*", default=[], metavar="ETA:FIRST_RUNG",
                        help="further halving settings to compare (sequential only), e.g. 2:0.03125 4:0.0625")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_dataset(DataSpec(dataset="cifar10-mini"))
    halving = {"kind": "halving", "eta": args.eta, "first_rung": args.first_rung}
    modes = {"full": ({"kind": "full"}, False), "halving": (halving, False), "halving+batched": (halving, True)}
    for more in args.more:
        eta, first = (float(v) for v in more.split(":"))
        modes[f"halving {eta:g}:{first:g}"] = ({"kind": "halving", "eta": eta, "first_rung": first}, False)

    plan = rungs(ScheduleSpec(**halving), args.restarts, args.iterations)
    print(f"IG, {args.restarts} restarts x {args.iterations} iterations, {args.threads} thread(s); halving eta "
          f"{args.eta}, first rung {args.first_rung}: rungs {plan}, {planned_iterations(plan)} iterations "
          f"(full: {args.restarts * args.iterations})")
    print(f"{'model':8} {'seed':>4} {'mode':20} {'wall s':>8} {'PSNR dB':>8} {'iters':>7}")
    for name in args.models:
        totals = {mode: [0.0, 0.0] for mode in modes}
        for seed in args.seeds:
            update, truth = victim(bundle, name, seed)
            for batched in (False, True):  # warm-up (lazy imports, first-call set-up), not timed
                run(update, truth, 2, 2, {"kind": "halving"}, batched)
            for mode, (schedule, batched) in modes.items():
                wall, psnr, spent = run(update, truth, args.iterations, args.restarts, schedule, batched)
                totals[mode][0] += wall
                totals[mode][1] += psnr / len(args.seeds)
                print(f"{name:8} {seed:>4} {mode:20} {wall:8.1f} {psnr:8.2f} {spent:7.0f}", flush=True)
        base = totals["full"][0]
        for mode, (wall, psnr) in totals.items():
            print(f"{name:8} {'all':>4} {mode:20} wall {wall:7.1f} s = {wall / base:.3f}x full, "
                  f"mean PSNR {psnr:.2f} dB ({psnr - totals['full'][1]:+.2f} vs full)", flush=True)


if __name__ == "__main__":
    main()
