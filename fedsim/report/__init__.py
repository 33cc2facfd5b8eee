"""Writing a run directory: resolved scenario, metrics.json, pictures and summary.md."""

from fedsim.report.writer import write_run_dir

__all__ = ["write_run_dir"]
