"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller; NeurIPS 2020).

Reconstruct the client's batch ``x*`` by minimizing, over dummy inputs ``x`` in normalized space,

    D(grad_theta CE(f_theta(x), y), g*) + alpha_TV * TV(x),

with ``D`` the global cosine distance (eq. 4 of the paper), Adam on the *sign* of the input gradient,
projection onto the pixel box ``[-mu/sigma, (1-mu)/sigma]`` after each step, and a step decay of the
learning rate (x0.1 at 3/8, 5/8 and 7/8 of the iterations). Labels come from the update (iDLG for a
single image, a count-aware method for batches) unless the threat model grants them. Restarts are
ranked by their final gradient distance, never by ground truth; ``schedule`` runs them by successive halving on
that distance (``{kind: halving, eta, first_rung, min_keep}``, :mod:`fedsim.attacks.schedule`; the default here,
eta 2 and a first rung of 1/8 of the iterations: on LeNet and ConvNet, 8 restarts x 2000 iterations, it matched the
full run's PSNR at 0.26-0.29x its wall time, ``benchmarks/restart_schedule.py``) or every restart in full
(``{kind: full}``), batched rung by rung when ``batched``. One restart runs in full either way. The default changed
to halving in issue 17 (before, every restart ran in full): with more than one restart, results (the winner, its
image, ``iterations_spent``) differ from earlier runs; ``params: {schedule: {kind: full}}`` gives the earlier
behaviour and numbers. Under halving the result is the best restart among those never pruned (one pruned at an
earlier rung only if none of them is usable, then ``best_pruned`` is 1), so it is always a full-budget run when
one is usable.

Restarts can run as one batched computation (``batched``; see :mod:`fedsim.attacks.batched`): each keeps
its own init, Adam state and schedule, and the result equals the sequential run's up to float
rounding (which the signed step can amplify into single-pixel drift, not into a quality change).
When the threat model grants ``knowledge.defense``, the deterministic part of the listed defenses
(clipping, pruning, ...) is applied to the dummy gradient before the distance, as GIFD does
(see :mod:`fedsim.attacks.defense_aware`).

The optimizer core, :func:`optimize_inputs`, and :func:`gradient_distance` are reusable by other
gradient-matching attacks; the class only wires the threat-model inputs, restarts and budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.batched import BatchedTrials, BatchingUnsupported, matching_loss, parameter_gradient
from fedsim.attacks.defense_aware import DefenseTransform, defense_transform
from fedsim.attacks.differences import message_of
from fedsim.attacks.input_adam import InputAdam
from fedsim.attacks.label_recovery import LABEL_STRATEGIES
from fedsim.attacks.matching import delta_scale_letter, examples_to_reconstruct, labels_for, unusable
from fedsim.attacks.objectives import OBJECTIVES, Distance
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import (
    SCHEDULE_HELP,
    ScheduleSpec,
    Sequential,
    Steps,
    planned_iterations,
    run_schedule,
    run_to_end,
    rungs,
)
from fedsim.attacks.victim import target_gradient, victim_model
from fedsim.errors import FedsimError
from fedsim.scenario import Knowledge
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction

PROGRESS_EVERY = 50


def pixel_box(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The image box ``[0, 1]`` in normalized space: ``(-mu/sigma, (1-mu)/sigma)``, shaped (1, C, 1, 1)."""
    mu = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    sigma = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return -mu / sigma, (1 - mu) / sigma


def to_pixels(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalized inputs back to pixel space, clamped to [0, 1], on the CPU."""
    mu = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    sigma = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x.detach() * sigma + mu).clamp(0, 1).cpu()


def from_pixels(p: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Pixel-space images (N, C, H, W) in [0, 1] to the model's normalized inputs ``(p - mu) / sigma`` (inverse
    of :func:`to_pixels` inside the box); same device and dtype as ``p``."""
    mu = torch.tensor(mean, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    sigma = torch.tensor(std, dtype=p.dtype, device=p.device).view(1, -1, 1, 1)
    return (p - mu) / sigma


def initial_inputs(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A dummy batch drawn on the CPU from ``generator`` (so it is the same on every device)."""
    if kind == "randn":
        return torch.randn(shape, generator=generator)
    if kind == "rand":
        return torch.rand(shape, generator=generator)
    if kind == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown init {kind!r} (known: randn, rand, zeros)")


def gradient_distance(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    target: list[Tensor],
    distance: Distance,
    create_graph: bool = True,
    transform: Callable[[Sequence[Tensor]], Sequence[Tensor]] | None = None,
) -> Tensor:
    """``D(T(m(x, y)), g*)``: the client's message for the dummy batch against ``target``.

    ``m`` is the mean cross-entropy's parameter gradient, or, when ``model`` carries a DIFF2 message
    (:func:`fedsim.attacks.victim.victim_model` attaches it, see :mod:`fedsim.attacks.differences`), the gradient
    difference against the reference model and/or the per-sample clipping the attacker models.
    ``y`` are class indices (B,) or probabilities (B, K). ``transform`` (``T``, e.g. a defense-aware
    attacker's model of clipping or pruning, see :func:`fedsim.attacks.defense_aware.defense_transform`) maps
    the list of per-parameter tensors, in ``model.parameters()`` order, before the distance; it must be
    differentiable.
    """
    grads: Sequence[Tensor]
    if message_of(model).plain:
        loss = F.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph)
    else:
        grads = parameter_gradient(model)(x, labels)
        if not create_graph:
            grads = [g.detach() for g in grads]
    if transform is not None:
        grads = transform(grads)
    return distance(grads, target)


@dataclass(frozen=True)
class Trial:
    """One optimization run: the final inputs, how many steps ran, and why it stopped early if it did."""

    x: Tensor
    iterations: int
    stopped: Literal["time limit", "non-finite loss"] | None = None


def input_steps(
    loss_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    iterations: int,
    lr: float,
    signed: bool = True,
    box: tuple[Tensor, Tensor] | None = None,
    decay: Literal["step", "none"] = "step",
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Steps[Trial]:
    """:func:`optimize_inputs` one step at a time: yields ``(i, Trial so far)`` after step ``i`` and returns the
    final :class:`Trial` (the restart protocol of :mod:`fedsim.attacks.schedule`). The step schedule is a
    function of the step index in ``iterations``, however the steps are spread over calls."""
    x = x0.detach().clone().requires_grad_(True)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay == "step" else []
    adam = InputAdam(x, lr, milestones)  # torch's single-tensor Adam + MultiStepLR, bitwise, without their costs
    for step in range(iterations):
        if deadline is not None and time.perf_counter() > deadline:
            return Trial(x.detach(), step, "time limit")
        loss = loss_fn(x)
        if not torch.isfinite(loss):
            return Trial(x.detach(), step, "non-finite loss")
        (grad,) = torch.autograd.grad(loss, [x])
        adam.step(grad.sign() if signed else grad)
        if box is not None:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
        if on_step is not None:
            on_step(step + 1)
        yield step + 1, Trial(x.detach(), step + 1)
    return Trial(x.detach(), iterations)


def optimize_inputs(
    loss_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    iterations: int,
    lr: float,
    signed: bool = True,
    box: tuple[Tensor, Tensor] | None = None,
    decay: Literal["step", "none"] = "step",
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Trial:
    """Minimize ``loss_fn(x)`` over ``x`` with Adam, as in Geiping et al. (2020), Sec. 4.

    ``signed`` replaces the gradient by its sign before the Adam step (the paper's signed Adam);
    ``box`` = (lower, upper) is enforced by projection after every step; ``decay="step"`` multiplies
    the learning rate by 0.1 at 3/8, 5/8 and 7/8 of ``iterations``. Stops early, returning the current
    iterate, when ``time.perf_counter()`` passes ``deadline`` or the loss becomes NaN/inf.
    ``on_step(i)`` is called after step ``i`` (1-based).
    """
    return run_to_end(input_steps(loss_fn, x0, iterations=iterations, lr=lr, signed=signed, box=box, decay=decay,
                                  deadline=deadline, on_step=on_step))


@register_attack("inverting_gradients")
class InvertingGradients(Attack):
    """Cosine gradient matching with a TV prior and signed, boxed Adam (Geiping et al., 2020).

    Reconstructs ``update.num_examples`` images. For ``fedavg`` updates the target is ``-delta`` on
    the parameters: the cosine distance is scale invariant, so the unknown local learning rate does
    not matter, and for a single local step the match is exact (several steps: an approximation;
    unrolling them is the FedAvg attack's job).
    """

    summary = "Inverting Gradients (Geiping et al. 2020): cosine gradient matching + TV, signed Adam"
    models_defenses = True  # knowledge.defense: apply the listed defenses' deterministic parts (GIFD-style)
    matches_differences = True  # dummy messages via gradient_distance / matching_loss (fedsim.attacks.differences)
    threat_model = "B"  # the SoK's letter for Geiping et al. 2020 (C when it rescales a FedAvg delta)
    assumes = ("natural images are smooth (a total-variation prior)",
               "FedAvg: exact for one local step (cosine needs no learning rate)")

    @classmethod
    def threat_model_for(cls, params: AttackParams, knowledge: Knowledge) -> str:
        """B (the SoK's letter), C when an L2/L1 distance rescales a FedAvg delta by the granted local
        hyperparameters (:func:`fedsim.attacks.matching.delta_scale_letter`)."""
        return delta_scale_letter(cls.threat_model, params.distance, knowledge)

    class Params(AttackParams):
        lr: float = Field(0.1, gt=0, description="Adam step size on the normalized inputs")
        tv: float = Field(0.01, ge=0, description="weight of the mean-form total variation prior")
        distance: Literal["cosine", "l2", "l1"] = "cosine"
        signed: bool = Field(True, description="step on the sign of the input gradient")
        boxed: bool = Field(True, description="project the inputs onto the valid pixel range")
        init: Literal["randn", "rand", "zeros"] = "randn"
        decay: Literal["step", "none"] = Field("step", description="lr x0.1 at 3/8, 5/8, 7/8")
        label_strategy: str = Field("auto", description="label inference when labels are not known")
        batched: Literal["auto"] | bool = Field(
            "auto", description="run the restarts as one vmapped computation; auto: on accelerators only"
        )
        schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec(kind="halving"),
                                       description=SCHEDULE_HELP + "; default halving (eta 2, first rung 1/8): the "
                                       "full run's PSNR at ~0.26-0.29x its time (benchmarks/restart_schedule.py); "
                                       "{kind: full} for the behaviour before issue 17 (every restart in full)")

        @field_validator("label_strategy")
        @classmethod
        def _known_strategy(cls, value: str) -> str:
            if value not in LABEL_STRATEGIES:
                raise ValueError(f"unknown label strategy {value!r} (known: {', '.join(LABEL_STRATEGIES)})")
            return value

    def _labels(self, update: ClientUpdate, num: int, model: nn.Module) -> Tensor:
        return labels_for(update, num, known=self.knowledge.labels == "known",
                          strategy=self.params.label_strategy, model=model)

    def _defense_transform(self, update: ClientUpdate, model: nn.Module) -> DefenseTransform | None:
        """The defense-aware transform of the dummy gradient; ``None`` unless ``knowledge.defense``."""
        if not self.knowledge.defense or not update.defenses:
            return None
        return defense_transform(update.defenses, [name for name, _ in model.named_parameters()])

    def _use_batched(self) -> bool:
        """``batched``: True/False as set; "auto" batches several restarts on accelerators only (on a
        CPU a ConvNet's double backward is compute-bound, so batching gains little, see
        ``benchmarks/attack_speed.py``)."""
        wanted = self.params.batched
        if wanted == "auto":
            wanted = self.device.type != "cpu"
        return bool(wanted) and self.budget.restarts > 1

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        p, budget = self.params, self.budget
        num = examples_to_reconstruct(update)
        try:
            model = victim_model(update, self.device)
            target = target_gradient(update, model)
            labels = self._labels(update, num, model).to(self.device)
            defense = self._defense_transform(update, model)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        transform = defense if defense is not None and defense.defenses else None
        distance = OBJECTIVES[p.distance]
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        restarts = budget.restarts
        options = {"iterations": budget.iterations, "lr": p.lr, "signed": p.signed, "decay": p.decay,
                   "box": pixel_box(update.task.mean, update.task.std, self.device) if p.boxed else None,
                   "deadline": deadline}

        def init(restart: int) -> Tensor:
            gen = torch_generator(self.seed, "ig", restart)
            return initial_inputs(p.init, (num, *update.task.input_shape), gen).to(self.device)

        def prior(x: Tensor) -> Tensor:
            return p.tv * total_variation(x)

        def loss_fn(x: Tensor) -> Tensor:
            loss = gradient_distance(model, x, labels, target, distance, transform=transform)
            return loss + prior(x) if p.tv > 0 else loss

        def score(_restart: int, trial: Trial) -> float:  # restarts are ranked by the gradient loss alone
            return gradient_distance(model, trial.x, labels, target, distance, False, transform).item()

        planned = planned_iterations(rungs(p.schedule, restarts, budget.iterations))
        book: RestartBook[Trial] = RestartBook()
        schedule: dict[str, float] | None = None
        if self._use_batched():
            loss = matching_loss(model, labels, target, distance, transform, prior if p.tv > 0 else None)
            x0 = torch.stack([init(restart) for restart in range(restarts)])

            def on_step(i: int, spent: int) -> None:
                if progress is not None and (i % PROGRESS_EVERY == 0 or i == budget.iterations):
                    progress(spent, planned)

            trials = BatchedTrials(loss, x0, wrap=Trial, score=lambda trial: score(-1, trial), on_step=on_step,
                                   **options)
            try:
                schedule = run_schedule(p.schedule, trials, restarts, budget.iterations, book)
            except BatchingUnsupported:
                book = RestartBook()  # e.g. random draws or Python branches on values in the model: one at a time
            except (RuntimeError, ValueError, IndexError) as err:
                return Reconstruction.failure(f"optimization failed: {err}", batched=1.0)
        batched = schedule is not None
        if schedule is None:
            cohort = Sequential(lambda i, on_step: input_steps(loss_fn, init(i), on_step=on_step, **options), score,
                                lambda trial: trial.stopped, iterations=budget.iterations, deadline=deadline,
                                progress=progress, planned=planned)
            try:
                schedule = run_schedule(p.schedule, cohort, restarts, budget.iterations, book)
            except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
                return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds, batched=float(batched))
        trial = book.best
        stats = {**book.stats(), **schedule, "iterations": float(trial.iterations), "batched": float(batched),
                 "seconds": seconds}
        if defense is not None:
            stats["defenses_modeled"] = float(len(defense.modeled))
            stats["defenses_skipped"] = float(len(defense.skipped))
        return Reconstruction(
            images=to_pixels(trial.x, update.task.mean, update.task.std), labels=labels.cpu(), stats=stats
        )
