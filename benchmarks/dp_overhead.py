"""DP-SGD overhead: step time and peak memory of one DP training step against one plain step, for every
shipped model, every grad-sample mode and the ``auto`` choice, in one run.

Each step is the one fedsim's client runs (``local_update``'s fedavg loop: zero_grad, forward, loss, backward,
optimizer step) on one batch of the model's typical shape; the DP step goes through the ``dp_sgd`` defense
itself (Opacus per-sample gradients in ``hooks``, ``functorch``, ``ew``; ghost clipping ``ghost``, Li et al.
ICLR 2022; book-keeping ``bk``, Bu et al. ICML 2023, :mod:`fedsim.defenses.bk_clipping`; per-example clipping and
noise in all). Variants are timed in one process, alternating (plain, then each mode, repeated); each reports the
MEDIAN of its trials (each trial the mean of ``--steps`` steps after two warm-up steps), so drifting load on a
shared machine hits them alike. One torch thread, as a fedsim client with ``num_cpus: 1`` has.

Peak memory (CPU): what one variant adds to the process at its peak: built alone (model, optimizer, hooks), two
warm-up steps, then the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) during one
step, minus the resident set before the variant was built; glibc's mmap threshold is fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``, set by re-executing this script) so that freed tensors go back to the system and each
variant starts from the same baseline. Linux only; elsewhere the column shows '-'.

Targets (issue 17 item 5): DP step <= 1.3x a plain step on ConvNet, LeNet and ResNet, <= 3x on the MLP.

Measured 2026-11-30 on the shared 2-core CPU machine (load 5-9, so single cells vary by up to +-40 %; the bk and auto
columns run the same code for every model but the ViT), time ratios: hooks / ghost / bk / auto[choice]:
  mlp       30-35x / 4.3-5.8x / 2.2-2.7x / 2.2-2.6x [bk]   target 3: met
  lenet     2.7-3.0x / 3.5-3.8x / 1.75-2.0x / 1.72x [bk]   target 1.3: MISSED
  convnet   1.6-1.8x / 2.0x / 1.2-1.4x / 1.0-1.3x [bk]     target 1.3: met within the noise
  resnet20  1.8x / 1.5x / 0.7x / 1.1x [bk]                 target 1.3: met
  resnet18  2.5x / 2.7x / 1.1x / 1.2x [bk]                 target 1.3: met
  vit       2.9x / 2.8x / n/a / 2.4x [hooks]               (class token and position embedding outside bk's layers)
  bert, gpt 3.6-5.0x / 2.6-4.5x / 1.6-1.9x / 1.7-2.0x [bk]
  fc10      5.5-14x / 3.3-7.3x / 1.2-3.8x [bk]             (a 0.9 ms plain step: per-step Python work dominates)
LeNet misses because its convolutions have 3 to 12 channels: one example's weight gradient is a tiny matrix product,
and the per-example gradients (one grouped convolution backward, the batch as 32 groups) cost 3-4 ms per layer
against 0.7-1.8 ms for the plain layer's whole backward on one thread; the ghost norm is dearer still (T = 256
output positions in the first layer: T^2 (d + p) > T d p). Peak memory: bk adds 1.3-1.6x a plain step's (2.8-3.5x on
the ResNets, their per-example convolution gradients), hooks 2.5-26x.

    python benchmarks/dp_overhead.py [--models mlp lenet ...] [--modes hooks ghost bk auto] [--trials 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import get_args

import torch

from fedsim.defenses.dp_sgd import DPSGD, DPSGDParams
from fedsim.errors import IncompatibleDefenseError
from fedsim.models import build_model
from fedsim.scenario import LocalTraining, ModelSpec
from fedsim.training import TrainingJob, lm_loss

#: model -> (input shape, classes or vocabulary, batch size, ModelSpec extras): the shapes fedsim's scenarios use
CONFIGS: dict[str, tuple[tuple[int, ...], int, int, dict]] = {
    "mlp": ((3, 32, 32), 10, 32, {}),
    "fc10": ((3, 32, 32), 10, 32, {}),
    "lenet": ((3, 32, 32), 10, 32, {}),
    "convnet": ((3, 32, 32), 10, 32, {"width": 32}),
    "resnet20": ((3, 32, 32), 10, 32, {}),
    "resnet18": ((3, 32, 32), 10, 32, {}),
    "vit": ((3, 32, 32), 10, 32, {}),
    "bert": ((16,), 1000, 8, {}),
    "gpt": ((12,), 1000, 8, {"width": 128}),
}
TARGETS = {"mlp": 3.0, "lenet": 1.3, "convnet": 1.3, "resnet20": 1.3, "resnet18": 1.3}
MODES = [m for m in get_args(DPSGDParams.model_fields["grad_sample_mode"].annotation) if m != "auto"]


def make_step(model_name: str, mode: str) -> tuple[Callable[[], None], str]:
    """A closure running one training step of ``model_name`` (plain when ``mode`` is 'plain'), and the mode run."""
    shape, classes, bs, extra = CONFIGS[model_name]
    text = model_name in ("bert", "gpt")
    vocab = classes if text else 0
    out = classes if model_name == "gpt" else (5 if text else classes)
    model = build_model(ModelSpec(name=model_name, **extra), shape, out, seed=0, vocab_size=vocab)
    n = 50 * bs
    local = LocalTraining(batch_size=bs, lr=0.05, steps=1)
    loss = lm_loss if model_name == "gpt" else torch.nn.functional.cross_entropy
    job = TrainingJob(model, loss_fn=loss, seed=0, round=1, partition_id=0, num_examples=n)
    ran = "plain"
    if mode != "plain":
        defense = DPSGD(DPSGDParams(noise_multiplier=1.0, grad_sample_mode=mode), "dp_sgd")
        job.model = defense.transform_model(job.model)
        defense.check_model(job.model, shape)  # IncompatibleDefenseError: a mode this model cannot run (n/a)
        ran = defense.mode_for(job.model, loss)  # auto's choice (cached: the round below runs the same)
        job = defense.wrap_training(job)
        job.sample_batches(n, local, "fedavg", torch.Generator().manual_seed(0))  # fixes q and sigma
    opt = job.make_optimizer(job.model, local)
    gen = torch.Generator().manual_seed(1)
    if text:
        x = torch.randint(0, vocab, (bs, *shape), generator=gen)
        y = x if model_name == "gpt" else torch.randint(0, out, (bs,), generator=gen)
    else:
        x, y = torch.randn((bs, *shape), generator=gen), torch.randint(0, classes, (bs,), generator=gen)
    job.model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = job.loss_fn(job.model(x), y)
        loss.backward()
        opt.step()

    return step, ran


def _read_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_mib(model_name: str, mode: str) -> float | None:
    """Peak resident memory one variant adds (module doc), MiB; None where /proc cannot tell."""
    gc.collect()
    before = _read_kib("VmRSS:")
    step, _ = make_step(model_name, mode)
    step()
    step()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    step()
    peak = (_read_kib("VmHWM:") - before) / 1024
    del step
    gc.collect()
    return peak if before else None


def measure(models: list[str], modes: list[str], trials: int, steps: int) -> dict:
    """Median seconds per step, peak memory growth (MiB) and the mode run, for every (model, variant)."""
    out = {}
    for m in models:  # one model at a time: its variants alternate, and only its steppers are alive
        usable = ["plain"]
        for mode in modes:
            try:
                make_step(m, mode)
                usable.append(mode)
            except IncompatibleDefenseError as err:
                print(f"  {m} {mode}: n/a ({str(err)[:100]})", file=sys.stderr, flush=True)
        mem = {mode: peak_mib(m, mode) for mode in usable}
        steppers = {mode: make_step(m, mode) for mode in usable}
        for step, _ in steppers.values():  # warm-up: first calls allocate and (functorch) trace
            step()
            step()
        times: dict[str, list[float]] = {mode: [] for mode in steppers}
        for _ in range(trials):
            for mode, (step, _) in steppers.items():
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[mode].append((time.perf_counter() - start) / steps)
        for mode, (_, ran) in steppers.items():
            out[(m, mode)] = (statistics.median(times[mode]), mem[mode], ran)
        print(f"  measured {m}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="MODEL",
                        help=f"one or more of: {', '.join(CONFIGS)}")
    modes = [*MODES, "auto"] if "auto" in get_args(DPSGDParams.model_fields["grad_sample_mode"].annotation) else MODES
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes, metavar="MODE",
                        help=f"one or more of: {', '.join(modes)}")
    args = parser.parse_args()
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors return to the system (see module doc)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)
    res = measure(args.models, args.modes, args.trials, args.steps)
    print(f"median of {args.trials} trials x {args.steps} steps, 1 thread; time ratio = DP step / plain step; "
          "m = peak memory ratio (peak MiB a variant adds, plain's in the MiB column; 'NM': N MiB where plain "
          "adds under 1 MiB); [mode] = what auto ran")
    print(f"{'model':<9} {'bs':>3} {'plain ms':>9} {'MiB':>6} " + " ".join(f"{m:>15}" for m in args.modes)
          + "  target")
    for m in args.models:
        plain, pmem, _ = res[(m, "plain")]
        cells = []
        for mode in args.modes:
            if (m, mode) not in res:
                cells.append("n/a")
                continue
            t, mem, ran = res[(m, mode)]
            # a plain step of a tiny model adds under 1 MiB (page granularity): its ratio would mean nothing
            memtxt = "-" if mem is None or pmem is None else f"{mem / pmem:.1f}" if pmem >= 1 else f"{mem:.0f}M"
            cells.append(f"{t / plain:>6.2f}x m{memtxt:>5}" + (f"[{ran}]" if mode == "auto" else ""))
        target = TARGETS.get(m)
        pick = "auto" if (m, "auto") in res else min((k for k in args.modes if (m, k) in res),
                                                     key=lambda k: res[(m, k)][0])
        r = res[(m, pick)][0] / plain
        verdict = "" if target is None else f"{'met' if r <= target else 'MISSED'} ({pick} {r:.2f}x, target {target})"
        print(f"{m:<9} {CONFIGS[m][2]:>3} {plain * 1e3:>9.2f} {pmem or 0:>6.1f} " + " ".join(f"{c:>15}" for c in cells)
              + f"  {verdict}")


if __name__ == "__main__":
    main()
