"""Attack speed: Inverting Gradients' restarts run one at a time against K restarts batched with vmap.

For each model (ConvNet width 32 and LeNet(Zhu) at 32x32, batch 1, untrained, fedsgd) it prints, from
one run, milliseconds per iteration of

* ``single``: 1 trial, the sequential optimizer (``optimize_inputs``), as IG runs one restart;
* ``batched(K)``: K trials as one vmapped computation (``fedsim.attacks.batched.optimize_trials``);
* ``sequential(K)``: the same K trials one after another (K x ``optimize_inputs``);

and the ratio batched(K)/single (target <= 2 on small models) and sequential(K)/batched(K) (the
speed-up of batching). Repeats alternate between the three modes and the best of ``--repeats`` is
kept, so load from other processes hits every mode alike. Peak memory: on CPU, the growth of the
peak RSS (``VmHWM``, reset through /proc/self/clear_refs; else ``resource.getrusage``) over the RSS
after set-up, each mode in a fresh process; on CUDA, ``torch.cuda.max_memory_allocated``. The victim
image is random (speed does not depend on content).

    python benchmarks/attack_speed.py [--trials 8] [--iterations 20] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.attacks.batched import optimize_trials, parameter_gradient  # noqa: E402
from fedsim.attacks.inverting_gradients import gradient_distance, optimize_inputs, pixel_box  # noqa: E402
from fedsim.attacks.objectives import cosine  # noqa: E402
from fedsim.attacks.regularizers import total_variation  # noqa: E402
from fedsim.attacks.victim import attacker_mode  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scenario import ModelSpec  # noqa: E402

MODELS = {"convnet-w32": ModelSpec(name="convnet", width=32), "lenet": ModelSpec(name="lenet")}
SHAPE = (3, 32, 32)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TV = 0.01
MODES = ("single", "batched", "sequential")


class Problem:
    """One victim (model, label, target gradient) and IG's two loss functions for it."""

    def __init__(self, name: str, device: torch.device, batch: int = 1) -> None:
        gen = torch.Generator().manual_seed(0)
        self.model = attacker_mode(build_model(MODELS[name], SHAPE, 10, seed=0).to(device))
        x = ((torch.rand((batch, *SHAPE), generator=gen) - 0.5) / 0.25).to(device)
        self.labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
        loss = F.cross_entropy(self.model(x), self.labels)
        self.target = [g.detach() for g in torch.autograd.grad(loss, list(self.model.parameters()))]
        self.box = pixel_box(MEAN, STD, device)
        self.shape = (batch, *SHAPE)
        self.device = device
        grad_fn = parameter_gradient(self.model)
        self.sequential_loss: Callable[[torch.Tensor], torch.Tensor] = (
            lambda z: gradient_distance(self.model, z, self.labels, self.target, cosine) + TV * total_variation(z)
        )
        self.trial_loss: Callable[[torch.Tensor], torch.Tensor] = (
            lambda z: cosine(grad_fn(z, self.labels), self.target) + TV * total_variation(z)
        )

    def inits(self, trials: int) -> torch.Tensor:
        return torch.randn((trials, *self.shape), generator=torch.Generator().manual_seed(1)).to(self.device)

    def run(self, mode: str, trials: int, iterations: int) -> None:
        """``iterations`` steps of ``trials`` trials in ``mode`` (single: one trial)."""
        x0 = self.inits(1 if mode == "single" else trials)
        kw = {"iterations": iterations, "lr": 0.1, "box": self.box, "decay": "none"}
        if mode == "batched":
            optimize_trials(self.trial_loss, x0, **kw)
        else:
            for k in range(len(x0)):
                optimize_inputs(self.sequential_loss, x0[k], **kw)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timings(name: str, device: torch.device, trials: int, iterations: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` ms per iteration for each mode, the modes alternating within each repeat."""
    problem = Problem(name, device)
    for mode in MODES:  # warm-up: allocator, oneDNN/cuDNN plans, functorch tracing caches
        problem.run(mode, trials, 2)
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(repeats):
        for mode in MODES:
            problem.sync()
            start = time.perf_counter()
            problem.run(mode, trials, iterations)
            problem.sync()
            best[mode] = min(best[mode], (time.perf_counter() - start) * 1000 / iterations)
    return best


def _status_mib(field: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_child(name: str, mode: str, trials: int, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    problem = Problem(name, torch.device("cpu"))
    problem.run("single", 1, 1)  # load kernels, so the baseline holds the libraries' memory
    base = _status_mib("VmRSS")
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        problem.run(mode, trials, 3)
        queue.put(_status_mib("VmHWM") - base)
    except OSError:  # no reset: the peak since start-up (includes set-up, so an upper bound)
        problem.run(mode, trials, 3)
        queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)


def peak_memory_mib(name: str, mode: str, device: torch.device, trials: int, threads: int) -> float:
    """Peak memory growth of one short run of ``mode`` (MiB)."""
    if device.type == "cuda":
        problem = Problem(name, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        problem.run(mode, trials, 3)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, mode, trials, threads, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # refuse now, not deep inside a timing
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    k = args.trials
    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
          f"batch 1, 32x32, {args.iterations} iterations per timing, best of {args.repeats} alternating repeats")
    for name in args.models:
        ms = timings(name, device, k, args.iterations, args.repeats)
        print(f"\n{name}: ms/iteration  single {ms['single']:.2f} | batched({k}) {ms['batched']:.2f} | "
              f"sequential({k}) {ms['sequential']:.2f}")
        ratio = ms["batched"] / ms["single"]
        print(f"  batched({k})/single = {ratio:.2f} (target <= 2: {'met' if ratio <= 2 else 'MISSED'}); "
              f"sequential({k})/batched({k}) = {ms['sequential'] / ms['batched']:.2f}x speed-up")
        if not args.no_memory:
            mem = {mode: peak_memory_mib(name, mode, device, k, args.threads) for mode in MODES}
            what = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth"
            print(f"  {what} (MiB): single {mem['single']:.1f} | batched({k}) {mem['batched']:.1f} | "
                  f"sequential({k}) {mem['sequential']:.1f}")


if __name__ == "__main__":
    main()
