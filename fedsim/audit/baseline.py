"""The canaries' cost in utility: the same scenario and seed without canaries, and the block's baseline fields.

``fedsim audit`` (:mod:`fedsim.audit.cli`) runs :func:`baseline_scenario` (nothing written) and hands its final
test accuracy to :func:`fedsim.run.run_scenario` (``audit_baseline``), which puts it in the ``audit`` block with
:func:`with_baseline` before the run directory is written, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsim.scenario import Scenario


def baseline_scenario(scenario: Scenario) -> Scenario:
    """The same scenario and seed without the ``audit:`` block (no canaries). Its attacks are dropped unless the
    server is malicious: an honest-but-curious server's attacks run after the federation and change nothing the
    accuracy depends on, while a malicious server's change the models the clients train."""
    keep = scenario.server.role != "honest_but_curious"
    return scenario.model_copy(update={"audit": None, **({} if keep else {"attacks": []})})


def with_baseline(audit: Mapping[str, Any], baseline_accuracy: float | None) -> dict[str, Any]:
    """A copy of an ``audit`` block whose ``utility`` holds the run without canaries: ``baseline_test_accuracy``
    and ``accuracy_drop`` = baseline - with canaries (positive: the canaries cost accuracy), None when either is
    unknown (a regression task has no accuracy)."""
    block = dict(audit)
    utility = dict(block.get("utility") or {})
    acc = utility.get("test_accuracy")
    known = isinstance(acc, int | float) and isinstance(baseline_accuracy, int | float)
    utility["baseline_test_accuracy"] = baseline_accuracy
    utility["accuracy_drop"] = baseline_accuracy - acc if known else None
    block["utility"] = utility
    return block
