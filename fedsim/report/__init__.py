"""Writing a run directory (resolved scenario, metrics.json, pictures, summary.md, reconstructions.npz) and the
self-contained HTML report of a run or benchmark directory (:func:`render_report`)."""

from fedsim.report.html import render_report
from fedsim.report.writer import write_run_dir

__all__ = ["render_report", "write_run_dir"]
