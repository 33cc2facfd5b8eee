"""Start-up cost (issue 17 item 4): what a command imports before it needs it, and the run's start-up time.

Kind 1, eager heavy imports: ``import fedsim.cli`` (every ``fedsim`` command, ``--help`` included) must not
import torch or any library that only a run, a score or a plot needs; measured 13-20 s on a loaded
2-core machine when it did (torchmetrics pulled torchvision, scipy and matplotlib), 0.35 s now. Kind 2:
``timing.startup_s`` in metrics.json, from ``run_scenario``'s entry to round 1's training messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HEAVY = ("torch", "torchvision", "torchmetrics", "scipy", "sklearn", "matplotlib", "flwr", "ray", "opacus",
         "rouge_score", "nltk", "transformers", "lpips", "pandas")


def _imported_after(code: str) -> list[str]:
    """The HEAVY top-level modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in done.stdout.strip().split(",") if m]


def test_the_cli_imports_no_heavy_library() -> None:
    assert _imported_after("import fedsim.cli") == []


@pytest.mark.slow  # a fresh interpreter importing torch: 3-10 s
def test_registries_validate_and_list_import_no_scorer_plotting_or_zo_library() -> None:
    """The plug-ins, ``fedsim validate`` and ``fedsim list`` need torch (and Flower for the server-side defenses);
    scoring (torchmetrics, scipy, rouge), plotting (matplotlib) and a zeroth-order task's scikit-learn are imported
    where they are used (scikit-learn alone took 10 s of ``fedsim list`` on a loaded machine)."""
    code = "import fedsim.attacks, fedsim.defenses, fedsim.preflight, fedsim.zo.tasks, fedsim.zo.spec, fedsim.cli"
    assert set(_imported_after(code)) <= {"torch", "flwr"}


def test_run_records_startup_to_first_round(tmp_path: Path, tiny_raw: dict[str, Any]) -> None:
    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    tiny_raw["attacks"] = []
    result = run_scenario(parse_scenario(tiny_raw), tmp_path / "run")
    timing = json.loads((result.out_dir / "metrics.json").read_text())["timing"]
    assert 0 < timing["startup_s"] <= timing["federation_s"] <= timing["total_s"]
    # it ends before round 1's work is done: round 1's row (seconds since the server app started; round 0 is the
    # initial evaluation) is stamped after it, and the server started at most federation_s - the last row's seconds
    round1 = next(row["seconds"] for row in result.history if row["round"] == 1)
    assert timing["startup_s"] < timing["federation_s"] - result.history[-1]["seconds"] + round1


@pytest.mark.slow  # a fresh interpreter importing torch and running a 2-iteration attack: 4-10 s
def test_a_first_reconstruct_does_not_import_torch_dynamo() -> None:
    """Inverting Gradients steps its inputs with the written-out Adam (fedsim.attacks.input_adam): a process that
    never trained (the driver of a Ray run, a script) does not pay torch.optim's torch._dynamo import."""
    code = """
import sys, torch
import torch.nn.functional as F
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.models import build_model
from fedsim.scenario import Budget, Knowledge, ModelSpec
from fedsim.threat import ClientUpdate, TaskInfo
spec = ModelSpec(name="convnet", width=4)
model = build_model(spec, (3, 8, 8), 3, seed=0)
x, y = torch.rand(1, 3, 8, 8), torch.tensor([1])
grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
task = TaskInfo("t", (3, 8, 8), 3, (0.5,) * 3, (0.25,) * 3, spec.model_dump(), "fedsgd")
update = ClientUpdate(0, 0, task, model.state_dict(), dict(zip([n for n, _ in model.named_parameters()], grads)), 1)
rec = InvertingGradients(InvertingGradients.Params(), Knowledge(labels="infer"), Budget(iterations=2, restarts=2),
                         torch.device("cpu"), 0).reconstruct(update)
assert rec.failed is None, rec.failed
print("dynamo" if "torch._dynamo" in sys.modules else "")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
