"""fedsim's Inverting Gradients against breaching's, on the same model and the same gradient.

Installs nothing. When ``breaching`` (PyPI, with ``hydra-core`` and ``omegaconf``; keep it out of fedsim's own
environment, e.g. ``python -m venv --system-site-packages /work/venv-breaching``) is importable, then for each
model (fedsim's LeNet and ConvNet, built by ``fedsim.models.build_model`` with seed 0, untrained, no norm layers)
one client's FedSGD gradient of a real batch (bundled ``cifar10-mini``, train split, images ``--images``; mean
cross-entropy in train mode, as ``tests/helpers.make_update`` builds it) is attacked by

* breaching: ``breaching.attacks.prepare_attack`` with hydra's ``attack=invertinggradients`` config (cosine
  objective, TV, signed Adam, boxed, step decay, randn init, restarts scored by the cosine loss), with
  ``restarts.num_trials``, ``optim.max_iterations`` and ``regularization.total_variation.scale`` set here;
* fedsim ``halving``: ``inverting_gradients`` with ``schedule: {kind: halving}`` and the other schedule fields at
  their defaults (``fedsim.attacks.schedule.ScheduleSpec``; eta 2, first rung 1/8 of the iterations when written:
  8 restarts cost 2.5 x the iterations of one instead of 8 x; the header line prints the plan);
* fedsim ``full``: the same with ``schedule: {kind: full}`` (every restart runs every iteration, as breaching).

Every run: ``--restarts`` x ``--iterations`` (default 8 x 2000; ``--quick``: 8 x 200), 1 torch thread, labels
given to both (the true labels; breaching's ``metadata.labels``, fedsim's ``knowledge.labels: known``). Printed per
model: wall and CPU seconds of each, the ratios fedsim/breaching, and the PSNR of each reconstruction by one scorer,
fedsim's Hungarian-matched PSNR (``fedsim.metrics.leakage.score_reconstruction``, mean over the batch, dB).

Same settings on both sides: cosine gradient distance over all parameters jointly; TV weight ``--tv`` (default
fedsim's 0.01; breaching's IG preset uses 0.2); Adam with lr 0.1 on the sign of the input gradient; projection onto
the valid pixel box after every step; lr x 0.1 at 3/8, 5/8, 7/8 of the iterations; standard-normal initialisation in
normalised space; the final pick among restarts by the cosine loss without the prior. Differences that remain:
(1) breaching returns, per restart, the iterate with the lowest objective seen over the run, fedsim the last one;
(2) breaching's TV convolves with zero padding (the image border counts against 0) and adds 1e-8 inside |.|, fedsim's
is the mean absolute difference of neighbouring pixels inside the image; (3) breaching's cosine has no epsilon in
the denominator, fedsim's 1e-8; (4) the random initial images differ (breaching draws from torch's global generator,
seeded here with 0; fedsim from its per-restart seeds); (5) breaching's step-decay milestones are
``N // 2.667, N // 1.6, N // 1.142`` (749, 1250, 1751 for N = 2000), fedsim's ``int(N * 3/8)`` etc. (750, 1250, 1750).

Measured here (2 shared cores at low load, 8 x 2000, 1 thread, image 0, TV 0.01, breaching 0.1.2, torch 2.14):
LeNet breaching 155.5 s, 17.25 dB; fedsim halving 35.3 s (0.227 x), 18.04 dB; fedsim full 111.6 s (0.72 x), 18.01 dB.
ConvNet breaching 203.3 s, 22.79 dB; fedsim halving 47.6 s (0.234 x), 24.03 dB; fedsim full 200.9 s (0.99 x, run
under some load), 24.03 dB. One image and one seed: the PSNRs are single draws.

    python benchmarks/vs_breaching.py [--quick] [--models lenet convnet] [--restarts 8] [--iterations 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import logging
import sys
import time
import warnings
from pathlib import Path

MODEL_NAMES = ("lenet", "convnet")
NOT_INSTALLED = ("vs_breaching: breaching is not installed (pip install breaching hydra-core omegaconf, in a separate "
                 "environment); nothing to compare")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 restarts x 200 iterations")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=None, help="default 2000 (--quick: 200)")
    parser.add_argument("--images", type=int, nargs="+", default=[0], help="cifar10-mini train indices (the batch)")
    parser.add_argument("--tv", type=float, default=0.01, help="TV weight on both sides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-full", action="store_true", help="skip fedsim's full schedule (reference only)")
    return parser


if __name__ == "__main__":  # --help, bad arguments and an absent breaching answer before torch and fedsim load (~6 s)
    _parser().parse_args()
    if importlib.util.find_spec("breaching") is None:
        print(NOT_INSTALLED)
        sys.exit(0)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.data import load_dataset, normalize  # noqa: E402
from fedsim.metrics.leakage import score_reconstruction  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec  # noqa: E402
from fedsim.threat import ClientUpdate, GroundTruth, Reconstruction, TaskInfo  # noqa: E402

MODELS = {"lenet": ModelSpec(name="lenet"), "convnet": ModelSpec(name="convnet", width=32)}
assert tuple(MODELS) == MODEL_NAMES


def _breaching():  # noqa: ANN202 - the module, or None
    """``breaching`` if importable (its import prints a TorchScript deprecation warning: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import breaching
        except ImportError:
            return None
    return breaching


class Case:
    """One model, one client's FedSGD gradient of a real batch, and the ground truth to score against."""

    def __init__(self, name: str, images: list[int]) -> None:
        bundle = load_dataset(DataSpec(dataset="cifar10-mini"))
        self.bundle, self.spec = bundle, MODELS[name]
        self.model = build_model(self.spec, bundle.input_shape, bundle.num_classes, seed=0)
        self.model.train()
        self.x, self.y = bundle.train_x[images], bundle.train_y[images]
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        loss = F.cross_entropy(self.model(normalize(self.x, bundle.mean, bundle.std)), self.y)
        self.grads = [g.detach() for g in torch.autograd.grad(loss, list(self.model.parameters()))]
        names = [n for n, _ in self.model.named_parameters()]
        task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                        self.spec.model_dump(), "fedsgd")
        self.update = ClientUpdate(0, 0, task, state, dict(zip(names, self.grads, strict=True)), len(self.x),
                                   side_info={"labels": self.y.clone()})
        self.truth = GroundTruth(0, 0, self.x, self.y)

    def psnr(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """fedsim's Hungarian-matched PSNR (dB), mean over the batch; images in pixel space [0, 1]."""
        score = score_reconstruction(Reconstruction(images=images.detach().cpu(), labels=labels.cpu()), self.truth,
                                     lpips=False)
        return float(score["psnr_mean"])


def timed(fn):  # noqa: ANN001, ANN201 - (result, wall s, cpu s)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_fedsim(case: Case, schedule: str, restarts: int, iterations: int, tv: float) -> tuple[float, float, float]:
    """(PSNR dB, wall s, CPU s) of fedsim's Inverting Gradients under ``schedule``."""
    from fedsim.attacks.inverting_gradients import InvertingGradients

    params = InvertingGradients.Params(tv=tv, lr=0.1, distance="cosine", signed=True, boxed=True, init="randn",
                                       decay="step", batched=False, schedule={"kind": schedule})
    attack = InvertingGradients(params, Knowledge(labels="known"), Budget(iterations=iterations, restarts=restarts),
                                torch.device("cpu"), 0)
    rec, wall, cpu = timed(lambda: attack.reconstruct(case.update))
    if rec.failed:
        raise SystemExit(f"fedsim {schedule}: {rec.failed}")
    return case.psnr(rec.images, rec.labels), wall, cpu


def run_breaching(breaching, case: Case, restarts: int, iterations: int, tv: float) -> tuple[float, float, float]:  # noqa: ANN001
    """(PSNR dB, wall s, CPU s) of breaching's Inverting Gradients (hydra ``attack=invertinggradients``)."""
    from omegaconf import OmegaConf

    overrides = [f"optim.max_iterations={iterations}", f"restarts.num_trials={restarts}",
                 f"regularization.total_variation.scale={tv}", "optim.step_size=0.1", "optim.signed=hard",
                 "optim.boxed=True", "init=randn", "objective.type=cosine-similarity",
                 "restarts.scoring=cosine-similarity", "optim.step_size_decay=step-lr"]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints the config it loaded
        warnings.simplefilter("ignore")  # hydra's version_base notice
        cfg = breaching.get_attack_config("invertinggradients", overrides=overrides)
    setup = {"dtype": torch.float, "device": torch.device("cpu")}
    b = case.bundle
    attacker = breaching.attacks.prepare_attack(copy.deepcopy(case.model), torch.nn.CrossEntropyLoss(), cfg, setup)
    meta = OmegaConf.create({"shape": list(b.input_shape), "mean": list(b.mean), "std": list(b.std),
                             "modality": "vision", "classes": b.num_classes})
    payload = [{"parameters": [p.detach().clone() for p in case.model.parameters()], "buffers": None,
                "metadata": meta}]
    labels = case.y.sort()[0]
    shared = [{"gradients": [g.clone() for g in case.grads], "buffers": None,
               "metadata": {"num_data_points": len(case.y), "labels": labels, "local_hyperparams": None}}]
    torch.manual_seed(0)
    (out, _), wall, cpu = timed(lambda: attacker.reconstruct(payload, shared, {}, dryrun=False))
    mean = torch.tensor(b.mean).view(1, -1, 1, 1)
    std = torch.tensor(b.std).view(1, -1, 1, 1)
    images = (out["data"].detach() * std + mean).clamp(0, 1)
    return case.psnr(images, out["labels"]), wall, cpu


def main() -> None:
    args = _parser().parse_args()
    breaching = _breaching()
    if breaching is None:  # found by find_spec but not importable (a missing dependency of its own)
        print(NOT_INSTALLED)
        return
    logging.getLogger("breaching").setLevel(logging.WARNING)
    iterations = args.iterations or (200 if args.quick else 2000)
    torch.set_num_threads(args.threads)
    from fedsim.attacks.schedule import ScheduleSpec, planned_iterations, rungs

    spec = ScheduleSpec(kind="halving")
    plan = rungs(spec, args.restarts, iterations)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; {args.restarts} restarts x "
          f"{iterations} iterations; cifar10-mini train images {args.images}; TV {args.tv}; labels given to both; "
          f"halving eta {spec.eta}, first rung {spec.first_rung}: rungs (restarts, until) {plan}, "
          f"{planned_iterations(plan) / (args.restarts * iterations):.3f} of full's iterations")
    for name in args.models:
        case = Case(name, args.images)
        run_breaching(breaching, case, 1, 2, args.tv)  # warm-up: first-call costs (kernels, allocator, caches)
        run_fedsim(case, "full", 1, 2, args.tv)
        rows = {"breaching": run_breaching(breaching, case, args.restarts, iterations, args.tv),
                "fedsim halving": run_fedsim(case, "halving", args.restarts, iterations, args.tv)}
        if not args.no_full:
            rows["fedsim full"] = run_fedsim(case, "full", args.restarts, iterations, args.tv)
        _, b_wall, b_cpu = rows["breaching"]
        print(f"\n{name} ({sum(p.numel() for p in case.model.parameters())} weights):")
        for what, (psnr, wall, cpu) in rows.items():
            ratio = "" if what == "breaching" else f"  fedsim/breaching wall {wall / b_wall:.3f}, cpu {cpu / b_cpu:.3f}"
            print(f"  {what:<15s} wall {wall:8.2f} s  cpu {cpu:8.2f} s  PSNR {psnr:6.2f} dB{ratio}")
        h_psnr, h_wall, h_cpu = rows["fedsim halving"]
        quality = h_psnr >= rows["breaching"][0]
        verdict = {what: "met" if ratio <= 0.25 and quality else "MISSED"
                   for what, ratio in (("wall", h_wall / b_wall), ("cpu", h_cpu / b_cpu))}
        print(f"  target (halving <= 0.25 x breaching at PSNR >= breaching's): wall {verdict['wall']}, cpu "
              f"{verdict['cpu']} (on a loaded machine the CPU ratio is the steadier one)")


if __name__ == "__main__":
    main()
