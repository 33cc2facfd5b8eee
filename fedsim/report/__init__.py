"""Run directories and reports: metrics.json, figures, summary.md and the self-contained report.html.

Names are imported lazily (PEP 562) so that ``fedsim --help`` does not pay for matplotlib and torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"render_report": "fedsim.report.html", "write_run_dir": "fedsim.report.writer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsim.report' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
