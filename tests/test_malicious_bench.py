"""Issue 14, "What stops them": the malicious grid's outcomes reach the bench report.

Kind guarded: an attack outcome that failed WITHOUT images (a client refused the malicious server's model, so the
attack got no update) is not in ``reconstructions.npz``, and the bench report's gallery said only "no images saved
for this row (failed cells, ...)" - the refusal was nowhere in report.html. The grid itself is checked by
tests/test_bench.py (it validates, 15 cells) and tests/test_comparisons.py (each row differs only in its defense).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedsim.bench.store import summarize_run
from fedsim.report import render_report
from fedsim.run import run_scenario
from fedsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
STEP10 = ROOT / "scenarios" / "tutorial" / "10_malicious_server.yaml"


def test_bench_report_names_the_refusal_of_a_cell_whose_attack_got_no_update(tmp_path: Path) -> None:
    """One round, model_check without SecAgg: client 0 refuses the imprint model, the others train; the cell is ok,
    its attack failed without images, and the bench report's gallery names the refusal."""
    scenario = load_scenario(STEP10, ["defenses=[{name: model_check}]", "federation.rounds=1",
                                      "federation.local.batch_size=4", "model.width=8"])
    result = run_scenario(scenario, tmp_path / "run")
    (outcome,) = result.outcomes
    assert outcome.failed is not None and "ModelRefusedError" in outcome.failed and outcome.truth is None
    bench = tmp_path / "bench"
    shutil.copytree(result.out_dir, bench / "cells" / "c1")
    metrics = json.loads((bench / "cells" / "c1" / "metrics.json").read_text(encoding="utf-8"))
    record = {"cell_id": "c1", "attack": "robbing_the_fed", "defense": "model_check", "params": {}, "repeat": 0,
              "seed": 0, "status": "ok", "error": None, "seconds": 1.0, "run_dir": "cells/c1",
              "summary": summarize_run(metrics)}
    (bench / "cells.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    html = render_report(bench).read_text(encoding="utf-8")
    assert "ModelRefusedError: model_check: the server&#x27;s model ships architecture changes" in html
