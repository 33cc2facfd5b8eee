"""Wiring shared by the gradient-matching attacks (DLG, iDLG, GradInversion, FedAvg inversion).

Only threat-model plumbing lives here: checking that an update can be attacked at all, the labels
(granted by the threat model or inferred from the update), the gradient to match, progress reports
and the local training schedule an attacker assumes. The optimizers stay in each attack's module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from fedsim.attacks.base import ProgressFn
from fedsim.attacks.label_recovery import LABEL_STRATEGIES, recover_labels
from fedsim.attacks.local_sgd import sum_of_gradients_problem
from fedsim.attacks.victim import UpdateMismatchError, check_update, target_gradient
from fedsim.errors import ThreatModelError
from fedsim.scenario import AttackSpec, Budget, Knowledge, Scenario
from fedsim.threat import ClientUpdate
from fedsim.threat_models import exercised_letter
from fedsim.training import epoch_bounds

PROGRESS_EVERY = 50


def _known_strategy(value: str) -> str:
    if value not in LABEL_STRATEGIES:
        raise ValueError(f"unknown label strategy {value!r} (known: {', '.join(LABEL_STRATEGIES)})")
    return value


#: A ``label_strategy`` parameter, validated against :data:`fedsim.attacks.label_recovery.LABEL_STRATEGIES`.
LabelStrategy = Annotated[str, AfterValidator(_known_strategy)]


def unusable(update: ClientUpdate | None, budget: Budget) -> str | None:
    """Why this update cannot be attacked with this budget, or ``None`` if it can."""
    reason = check_update(update)
    if reason is None and budget.iterations == 0:
        reason = "budget.iterations is 0: nothing to optimize"
    return reason


def examples_to_reconstruct(update: ClientUpdate) -> int:
    """How many examples to reconstruct from ``update`` (:attr:`ClientUpdate.examples_to_reconstruct`): the
    granted labels' count, else the declared ``num_examples`` (under DP-SGD the expected count); the
    evaluator matches the estimate one-to-one to the real batch."""
    return update.examples_to_reconstruct


def labels_for(update: ClientUpdate, num: int, *, known: bool, strategy: str, model: nn.Module) -> Tensor:
    """The ``num`` labels of the client's examples: ``update.side_info["labels"]`` when the threat model
    grants them (``known``), else inferred from the update's last layer with ``strategy``.

    Raises ``ValueError`` when granted labels are missing, of the wrong count or out of range.
    """
    if not known:
        return recover_labels(update, num, strategy, model=model)
    labels = update.side_info.get("labels")
    if labels is None:
        raise ValueError("knowledge.labels is 'known' but the update carries no labels")
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != num:
        raise ValueError(f"{len(labels)} known labels for {num} examples")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < update.task.num_classes:
        raise ValueError(f"known labels outside 0..{update.task.num_classes - 1}")
    return labels


def local_schedule(hyperparams: Mapping[str, Any], num_examples: int, min_batch: int = 1) -> tuple[int, int]:
    """``(steps, batch_size)`` of a FedAvg client's round, from the granted local hyperparameters.

    Mirrors :func:`fedsim.training.batch_schedule`: ``steps`` when set, else ``epochs`` passes of
    ``ceil(n / batch_size)`` steps (one fewer when ``min_batch`` 2 merges a pass's lone last example,
    :func:`fedsim.training.epoch_bounds`), with the batch size capped at ``n`` (the client's examples).
    Raises ``ValueError`` when the hyperparameters are not granted or do not make sense.
    """
    if not hyperparams:
        raise ValueError("the local hyperparameters are not known (grant knowledge.local_hparams: true)")
    n = int(num_examples)
    batch = min(int(hyperparams.get("batch_size") or n), n)
    if batch < 1:
        raise ValueError(f"cannot schedule batches of {batch} over {n} examples")
    steps = hyperparams.get("steps")
    if steps is None:
        steps = int(hyperparams.get("epochs", 1)) * len(epoch_bounds(n, batch, min_batch))
    if int(steps) < 1:
        raise ValueError(f"{steps} local steps")
    return int(steps), batch


def matching_target(update: ClientUpdate, model: nn.Module, *, rescale: bool) -> list[Tensor]:
    """The gradient to match (see :func:`fedsim.attacks.victim.target_gradient`).

    With ``rescale`` a FedAvg update is turned into the *mean* local gradient ``-delta / (lr * E)``
    (exact for one plain-SGD step), which scale-sensitive distances (L2) need; it requires the
    granted local learning rate and schedule. Raises ``ValueError``/``UpdateMismatchError``.
    """
    target = target_gradient(update, model)
    if not rescale or update.task.protocol != "fedavg":
        return target
    steps, _ = local_schedule(update.hyperparams, examples_to_reconstruct(update))
    lr = float(update.hyperparams.get("lr", 0.0))
    if not lr > 0:
        raise UpdateMismatchError(f"cannot rescale a weight delta with local lr {lr}")
    return [t / (lr * steps) for t in target]


def check_delta_scale(scenario: Scenario, spec: AttackSpec, distance: str) -> None:
    """Refuse a FedAvg scenario whose scale-sensitive ``distance`` cannot be matched without the local
    hyperparameters (see :func:`matching_target`); ``cosine`` is scale invariant and always fits."""
    if scenario.federation.protocol == "fedavg" and distance != "cosine" and not spec.knowledge.local_hparams:
        raise ThreatModelError(
            f"{spec.name} with distance {distance!r} matches a FedAvg delta as -delta / (lr * steps): "
            "grant knowledge.local_hparams: true, or use distance: cosine"
        )
    if distance != "cosine":  # the rescaling holds for plain SGD only (fedsim.attacks.local_sgd)
        problem = sum_of_gradients_problem(scenario, f"{spec.name} with distance {distance!r}", scale=True)
        if problem is not None:
            raise problem


def delta_scale_letter(letter: str, distance: str, knowledge: Knowledge) -> str:
    """The SoK letter of a gradient-matching attack whose paper letter is ``letter``: at least C (training details)
    when ``knowledge.local_hparams`` is granted and ``distance`` is scale sensitive, because it then rescales a FedAvg
    delta by the granted local learning rate and steps (:func:`matching_target`; :func:`check_delta_scale` refuses a
    FedAvg scenario that needs them and does not grant them); ``letter`` otherwise (cosine never reads them)."""
    return exercised_letter(letter, "C") if distance != "cosine" and knowledge.local_hparams else letter


class DeltaScaled:
    """Mixin for a gradient-matching attack whose ``params.distance`` may rescale a FedAvg delta: its SoK letter is
    :func:`delta_scale_letter` of its paper letter, and validation runs :func:`check_delta_scale`. List it before
    ``Attack`` (``class DLG(DeltaScaled, Attack)``)."""

    threat_model: str
    Params: Any

    @classmethod
    def threat_model_for(cls, params: Any, knowledge: Knowledge) -> str:
        return delta_scale_letter(cls.threat_model, params.distance, knowledge)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        super().check_scenario(scenario, spec)  # type: ignore[misc]
        check_delta_scale(scenario, spec, cls.Params.model_validate(spec.params).distance)


def ticker(progress: ProgressFn | None, per_run: int, total: int, offset: int) -> Callable[[int], None]:
    """``on_step(i)`` for run-local step ``i`` (1-based) reporting ``offset + i`` of ``total`` every
    :data:`PROGRESS_EVERY` steps and at the end of the run."""

    def on_step(i: int) -> None:
        if progress is not None and (i % PROGRESS_EVERY == 0 or i == per_run):
            progress(offset + i, total)

    return on_step
