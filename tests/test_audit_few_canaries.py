"""A one-run audit whose coins put fewer than 2 canaries on one side cannot fit a Gaussian: the run must still
write its audit block (bound and accountants stand), with the estimate marked as not estimated and the reason shown
in every output, instead of raising out of the run (issue 15's leftover)."""

from __future__ import annotations

import numpy as np

from fedsim.audit.cli import audit_table
from fedsim.audit.gaussian_fit import POOLED_METHOD, pooled_gaussian_estimate
from fedsim.audit.scoring import estimate_or_reason
from fedsim.report.audit import estimate_text


def test_one_canary_in_gives_no_estimate_and_a_reason() -> None:
    out = estimate_or_reason(pooled_gaussian_estimate, np.array([0.3]), np.array([0.0, 0.1, -0.1]), 1e-5, 0.95,
                             POOLED_METHOD)
    assert out["value"] is None and out["ci"] == [None, None]
    assert "1 were drawn in, 3 out" in out["not_estimated"]
    block = {"epsilon_estimate": out, "confidence": 0.95}
    assert estimate_text(block).startswith("not estimated: a Gaussian fit needs at least 2")
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=120)
    console.print(audit_table(block))
    assert "not estimated" in console.file.getvalue()


def test_two_on_each_side_is_estimated() -> None:
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(1.0, 1.0, 2), rng.normal(0.0, 1.0, 2)
    out = estimate_or_reason(pooled_gaussian_estimate, s_in, s_out, 1e-5, 0.95, POOLED_METHOD)
    assert out["value"] is not None and "not_estimated" not in out
