"""Start-up cost: how long fresh processes take before fedsim does any real work.

Each line is the best of ``--repeats`` fresh interpreters (wall and CPU time seen by this parent process, so it
includes the interpreter's own start, about 20 ms):

* ``python -c 'import torch'``: the floor every command that touches a model pays;
* ``import torch, torch._dynamo``: what a process's first ``torch.optim`` step adds (it imports ``torch._dynamo``);
* ``import fedsim.cli``: what every ``fedsim`` command pays before parsing its arguments;
* ``fedsim --help``: the console script, start to exit;
* ``fedsim validate <scenario>``: loading, validating and preflighting the quickstart scenario;
* ``import fedsim.attacks, fedsim.defenses``: the plug-in registries (every plug-in module imported);
* ``first reconstruct``: in one fresh process, Inverting Gradients' first ``reconstruct`` call on a
  ConvNet (width 32) update of one bundled CIFAR-10 image, 1 iteration, 1 restart, 1 torch thread, against
  a second identical call in the same process: ``first - second`` is the one-off set-up (lazy imports,
  kernel and allocator warm-up) a user pays before the first iteration. The import of the plug-ins is
  timed separately in the same process.

    python benchmarks/startup.py [--repeats 3] [--scenario scenarios/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECONSTRUCT = r"""
import json, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
t_torch = time.perf_counter()
import fedsim.attacks, fedsim.defenses
from fedsim.attacks.inverting_gradients import InvertingGradients
t_plugins = time.perf_counter()
import torch.nn.functional as F
from fedsim.data import load_dataset, normalize
from fedsim.models import build_model
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec
from fedsim.threat import ClientUpdate, TaskInfo
bundle = load_dataset(DataSpec(dataset="cifar10-mini"))
spec = ModelSpec(name="convnet", width=32)
model = build_model(spec, bundle.input_shape, bundle.num_classes, seed=0)
x, y = bundle.train_x[:1], bundle.train_y[:1]
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
loss = F.cross_entropy(model(normalize(x, bundle.mean, bundle.std)), y)
grads = torch.autograd.grad(loss, list(model.parameters()))
update = {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads)}
task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                spec.model_dump(), "fedsgd")
upd = ClientUpdate(0, 0, task, state, update, 1)
t_setup = time.perf_counter()
def once():
    attack = InvertingGradients(InvertingGradients.Params(), Knowledge(labels="infer"),
                                Budget(iterations=1, restarts=1), torch.device("cpu"), 0)
    start, cpu = time.perf_counter(), time.process_time()
    rec = attack.reconstruct(upd)
    assert rec.failed is None, rec.failed
    return time.perf_counter() - start, time.process_time() - cpu
(first, first_cpu), (second, second_cpu) = once(), once()
print(json.dumps({"import_torch": t_torch - t0, "import_plugins": t_plugins - t_torch,
                  "data_model_update": t_setup - t_plugins, "first": first, "second": second,
                  "first_cpu": first_cpu, "second_cpu": second_cpu}))
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fresh(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall and CPU (user + system) seconds of one fresh process, and its stdout; raises on a non-zero exit."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return wall, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenario", default="scenarios/quickstart.yaml")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fedsim = shutil.which("fedsim")
    py = sys.executable
    commands = {
        "python -c 'import torch'": [py, "-c", "import torch"],
        "import torch, torch._dynamo (torch.optim's 1st step)": [py, "-c", "import torch, torch._dynamo"],
        "import fedsim.cli": [py, "-c", "import fedsim.cli"],
        "fedsim --help": [fedsim, "--help"] if fedsim else [py, "-m", "fedsim.cli", "--help"],
        f"fedsim validate {args.scenario}": ([fedsim] if fedsim else [py, "-m", "fedsim.cli"])
        + ["validate", args.scenario],
        "import fedsim.attacks, fedsim.defenses": [py, "-c", "import fedsim.attacks, fedsim.defenses"],
    }
    best = dict.fromkeys(commands, float("inf"))
    best_cpu = dict.fromkeys(commands, float("inf"))
    recon: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every command alike
        for name, cmd in commands.items():
            wall, cpu, _ = _fresh(cmd, env)
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
        wall, _, out = _fresh([py, "-c", RECONSTRUCT], env)
        row = json.loads(out.strip().splitlines()[-1])
        if not recon or row["first"] < recon["first"]:
            recon = {**row, "wall": wall}
    print(f"fresh processes, best of {args.repeats}, {os.cpu_count()} cores, OMP_NUM_THREADS=1 (CPU: user + system "
          "of the process and its children; on a loaded machine it moves less than the wall time)")
    print(f"  {'':<50s} {'wall s':>7s} {'CPU s':>7s}")
    for name, seconds in best.items():
        print(f"  {name:<50s} {seconds:7.2f} {best_cpu[name]:7.2f}")
    print("  first IG reconstruct (ConvNet w32, 1 image, 1 iteration), one fresh process:")
    print(f"    import torch {recon['import_torch']:.2f} | import plug-ins {recon['import_plugins']:.2f} | "
          f"data+model+update {recon['data_model_update']:.2f}")
    print(f"    first reconstruct {recon['first']:.3f} | second {recon['second']:.3f} | "
          f"one-off set-up {recon['first'] - recon['second']:.3f} | process total {recon['wall']:.2f}")
    print(f"    CPU s: first reconstruct {recon['first_cpu']:.3f} | second {recon['second_cpu']:.3f} (the first "
          "IG steps without torch.optim, whose first step imports torch._dynamo)")


if __name__ == "__main__":
    main()
