"""Write a run directory in one piece: everything goes to ``<dir>.partial`` and is renamed at the end,
so a crash or Ctrl-C never leaves a run directory that looks finished but is not.

Both carry fedsim's marker (:mod:`fedsim.outputs`): a stale ``.partial`` is deleted only when fedsim
wrote it, and an existing run directory is replaced only on ``overwrite`` and only when it is one of
fedsim's (an empty directory may become the run directory); anything else is refused, untouched."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim import jsonio
from fedsim.errors import FedsimError
from fedsim.outputs import RUN, check_replaceable, fresh_partial, is_empty_dir, is_owned, remove_owned, write_atomic
from fedsim.report.audit import FIGURE_NAME as AUDIT_FIGURE
from fedsim.report.audit import audit_histogram
from fedsim.report.divergence import divergence_note
from fedsim.report.figures import reconstruction_grid, utility_curve
from fedsim.report.gallery import save_reconstructions
from fedsim.report.html import render_report
from fedsim.report.leakage import leakage_curve, leakage_plot
from fedsim.report.page import esc, page
from fedsim.report.summary import summary_markdown
from fedsim.report.text import TEXT_FILE, save_text, text_records
from fedsim.scenario import Scenario
from fedsim.threat_models import threat_model_record


def check_run_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse (FedsimError at ``--out``), before any work, a run directory :func:`write_run_dir` could not
    write without deleting something fedsim did not create. Nothing is touched."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, RUN, "--out", overwrite, "run directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    check_replaceable(partial, RUN, "--out", True, "run directory")


def write_run_dir(out_dir: Path, scenario: Scenario, history: Sequence[dict[str, float]],
                  outcomes: Sequence[Any], timing: dict[str, float], extra: dict[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """Write the run directory ``out_dir`` (scenario.yaml, metrics.json, summary.md, figures, report.html).

    ``overwrite`` lets an earlier fedsim run directory at ``out_dir`` be replaced. Raises
    :class:`~fedsim.errors.FedsimError` when ``out_dir`` (or ``<out_dir>.partial``) is something else.
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir, overwrite)
    partial = fresh_partial(out_dir, RUN)
    (partial / "scenario.yaml").write_text(
        yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    images: dict[str, str] = {}
    if scenario.output.save_images and reconstruction_grid(outcomes, partial / "reconstructions.png"):
        images["reconstructions"] = "reconstructions.png"
    if scenario.output.save_images:
        save_reconstructions(outcomes, partial / "reconstructions.npz")  # the images report.html shows
    if utility_curve(history, partial / "utility.png"):
        images["utility"] = "utility.png"
    curve = leakage_curve(outcomes)
    if leakage_plot(curve, history, partial / "leakage_rounds.png"):
        images["leakage_rounds"] = "leakage_rounds.png"
    text = _text_records(scenario, outcomes)  # a text run: sentences beside the originals (fedsim.report.text)
    if text is not None:
        save_text(text, partial / TEXT_FILE)
    metrics = {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "backend": scenario.backend.kind,
        "utility": list(history),
        "training_diverged": divergence_note(history),  # None, or the line summary.md and report.html show
        "leakage": curve,
        "attacks": [o.to_json() for o in outcomes],
        "threat_model": threat_model_record(scenario),  # server.role; per attack the SoK letter needed and granted
        "timing": timing,
        **(extra or {}),
    }
    (partial / "metrics.json").write_text(jsonio.dumps(metrics, indent=2), encoding="utf-8")
    if audit_histogram((extra or {}).get("audit"), partial / AUDIT_FIGURE):  # in vs out canary cosines
        images["audit"] = AUDIT_FIGURE
    summary = summary_markdown(scenario, history, outcomes, timing, images, (extra or {}).get("client_failures"),
                               privacy=(extra or {}).get("privacy"), client_metrics=(extra or {}).get("client_metrics"),
                               audit=(extra or {}).get("audit"), text=text)
    (partial / "summary.md").write_text(summary, encoding="utf-8")
    try:  # the same HTML report `fedsim report` writes; a drawing bug must not lose a finished run
        render_report(partial, name=out_dir.name)
        failed = None
    except Exception as err:  # noqa: BLE001 - recorded in every output below, then raised as ReportError
        failed = f"report.html could not be drawn: {type(err).__name__}: {err}"
        _record_report_failure(partial, metrics, summary, failed, out_dir)
    try:
        check_run_dir(out_dir, overwrite)  # again: something may have appeared there while we ran
    except Exception:
        remove_owned(partial, RUN)
        raise
    if is_empty_dir(out_dir):
        os.rmdir(out_dir)  # fails (and keeps it) if a file appeared in the meantime
    else:
        remove_owned(out_dir, RUN, "run directory")
    partial.rename(out_dir)
    if failed is not None:
        raise ReportError(f"{failed}; the run finished and its results are in {out_dir} (metrics.json, summary.md); "
                          f"`fedsim report {out_dir}` draws the report again")
    return out_dir


def _text_records(scenario: Scenario, outcomes: Sequence[Any]) -> list[dict[str, Any]] | None:
    """The text outcomes' records (:func:`fedsim.report.text.text_records`) of a run on a token dataset, decoded with
    its tokenizer; None for any other run. The sentences are kept only with ``output.save_images``."""
    from fedsim.data import facts_of

    if facts_of(scenario.data.dataset).inputs != "tokens":
        return None
    from fedsim.simulation.setup import setup_for

    tokenizer = setup_for(scenario).data.tokenizer if outcomes else ""
    return text_records(outcomes, tokenizer, sentences=scenario.output.save_images)


REPORT_ERROR_LINE = "**Error: "  # how summary.md's report-failure line starts (cleared by a later redraw)


class ReportError(FedsimError):
    """A finished run whose report.html could not be drawn: the run directory is complete otherwise, and its
    metrics.json (``report_error``), summary.md and a stand-in report.html say so. A fedsim fault, not bad input:
    the command exits 1."""

    exit_code = 1


def _record_report_failure(partial: Path, metrics: dict[str, Any], summary: str, failed: str, out_dir: Path) -> None:
    """Put the report failure into every output of the run directory being written (never only a warning)."""
    metrics["report_error"] = failed
    (partial / "metrics.json").write_text(jsonio.dumps(metrics, indent=2), encoding="utf-8")
    (partial / "summary.md").write_text(summary + f"\n{REPORT_ERROR_LINE}{failed}.** `fedsim report {out_dir}` "
                                        "draws it again.\n", encoding="utf-8")
    body = f'<section id="error"><h2>Report not drawn</h2><p class="bad">{esc(failed)}</p><p>The run finished; ' \
           f"metrics.json and summary.md hold its results. <code>fedsim report {esc(out_dir)}</code> draws this " \
           "report again.</p></section>"
    (partial / "report.html").write_text(page(f"fedsim report: {metrics.get('scenario')}", "single run", [body],
                                              "written by fedsim run"), encoding="utf-8")


def clear_report_failure(run_dir: Path) -> bool:
    """After ``fedsim report RUN_DIR`` redrew ``RUN_DIR/report.html``: replace an earlier report failure's record
    (``report_error`` in metrics.json, the Error line of summary.md) by a note that it was drawn again, so the
    outputs agree. Touches only a directory carrying fedsim's run marker; each file is rewritten atomically
    (summary.md first, so a crash between leaves metrics.json still saying the report failed). Returns whether
    a record was cleared."""
    run_dir = Path(run_dir)
    metrics_path, summary_path = run_dir / "metrics.json", run_dir / "summary.md"
    if not is_owned(run_dir, RUN) or not metrics_path.is_file():
        return False
    metrics = jsonio.loads(metrics_path.read_text(encoding="utf-8"))
    failed = metrics.get("report_error") if isinstance(metrics, dict) else None
    if not isinstance(failed, str):
        return False
    note = f"report.html was drawn again by `fedsim report` after an earlier failure ({failed})"
    if summary_path.is_file():
        lines = summary_path.read_text(encoding="utf-8").split("\n")
        lines = [f"Note: {note}." if line.startswith(f"{REPORT_ERROR_LINE}report.html could not be drawn") else line
                 for line in lines]
        text = "\n".join(lines)
        write_atomic(summary_path, lambda fh: fh.write(text.encode("utf-8")))
    del metrics["report_error"]
    metrics["report_redrawn"] = note
    write_atomic(metrics_path, lambda fh: fh.write(jsonio.dumps(metrics, indent=2).encode("utf-8")))
    return True
