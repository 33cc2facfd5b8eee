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
