"""The canaries' cost in utility: the same scenario and seed without canaries, and the block's baseline fields.

``fedsim audit`` (:mod:`fedsim.audit.cli`) runs :func:`baseline_scenario` (nothing written), reads its final test
accuracy and test loss (:func:`baseline_utility`) and hands them to :func:`fedsim.run.run_scenario`
(``audit_baseline``), which puts them in the ``audit`` block with :func:`with_baseline` before the run directory is
written, once. Every task has a test loss (MSE for a regression, cross-entropy for a classification), so the cost
is reported for every task; the accuracy only where the task has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.audit.scoring import last_accuracy, last_loss
from fedsim.scenario import Scenario


def baseline_scenario(scenario: Scenario) -> Scenario:
    """The same scenario and seed without the ``audit:`` block (no canaries). Its attacks are dropped unless the
    server is malicious: an honest-but-curious server's attacks run after the federation and change nothing the
    accuracy depends on, while a malicious server's change the models the clients train."""
    keep = scenario.server.role != "honest_but_curious"
    return scenario.model_copy(update={"audit": None, **({} if keep else {"attacks": []})})


def baseline_utility(history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """``{"test_accuracy", "test_loss"}`` of the last evaluated round of the run without canaries (None: the task
    has no accuracy, or nothing was evaluated)."""
    return {"test_accuracy": last_accuracy(history), "test_loss": last_loss(history)}


def _known(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def with_baseline(audit: Mapping[str, Any], baseline: Mapping[str, float | None]) -> dict[str, Any]:
    """A copy of an ``audit`` block whose ``utility`` holds the run without canaries (``baseline``:
    :func:`baseline_utility`): ``baseline_test_accuracy`` and ``accuracy_drop`` = baseline - with canaries
    (positive: the canaries cost accuracy; None when either is unknown, e.g. a regression), ``baseline_test_loss``
    and ``loss_increase`` = with canaries - baseline (positive: the canaries cost loss; None when either is
    unknown)."""
    block = dict(audit)
    utility = dict(block.get("utility") or {})
    acc, loss = utility.get("test_accuracy"), utility.get("test_loss")
    base_acc, base_loss = baseline.get("test_accuracy"), baseline.get("test_loss")
    utility["baseline_test_accuracy"] = base_acc
    utility["accuracy_drop"] = base_acc - acc if _known(acc, base_acc) else None
    utility["baseline_test_loss"] = base_loss
    utility["loss_increase"] = loss - base_loss if _known(loss, base_loss) else None
    block["utility"] = utility
    return block
