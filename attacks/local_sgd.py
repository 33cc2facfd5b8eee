"""The assumption "a FedAvg update is a sum of the client's plain SGD gradients", checked at validation.

Analytic attacks (Robbing the Fed's bin ratios, Fowl et al. ICLR 2022, Sec. 3) and delta rescaling
(``-delta / (lr * steps)``, :func:`fedsim.attacks.matching.matching_target`) read a FedAvg weight delta as ``-lr``
times a
sum of gradients. Adam's per-coordinate scaling breaks that for any attack; weight decay adds ``lr * wd * w`` (the
weights, not the data) to every step; momentum keeps a positive sum of gradients (fine for a ratio) but changes its
scale (not fine for a rescaling). :func:`sum_of_gradients_problem` names the field to edit.
"""

from __future__ import annotations

from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario


def sum_of_gradients_problem(scenario: Scenario, name: str, *, scale: bool) -> ScenarioError | None:
    """A :class:`ScenarioError` at the ``federation.local`` field that breaks attack ``name``'s reading of a FedAvg
    update as a sum of SGD gradients, or None (always None under FedSGD, whose update is the gradient itself).

    ``scale``: the attack also needs the sum's scale (``lr * steps``), so SGD momentum is refused too."""
    if scenario.federation.protocol != "fedavg":
        return None
    local = scenario.federation.local
    if local.optimizer != "sgd":
        return ScenarioError("federation.local.optimizer", f"{name} reads a FedAvg update as a sum of SGD "
                             f"gradients, which {local.optimizer}'s per-coordinate scaling breaks; use sgd")
    if local.weight_decay > 0:
        return ScenarioError("federation.local.weight_decay", f"{name} reads a FedAvg update as a sum of SGD "
                             "gradients, and weight decay adds lr * weight_decay * w (the weights, not the data) "
                             "to every step; set 0")
    if scale and local.momentum > 0:
        return ScenarioError("federation.local.momentum", f"{name} rescales a FedAvg update by lr * steps, which "
                             "momentum changes; set 0")
    return None
