"""Deep Leakage from Gradients (Zhu, Liu, Han; NeurIPS 2019) and iDLG (Zhao, Mopuri, Bilen; 2020).

DLG (eq. 4 of the paper) optimizes a dummy batch ``x'`` *and* dummy soft labels ``y' = softmax(z')``
(B x K logits ``z'``) jointly, so that their gradient matches the one the client sent:

    x'*, z'* = argmin_{x', z'} || grad_theta CE(f_theta(x'), softmax(z')) - g* ||^2,

with the soft-target cross-entropy, L-BFGS at lr 1 (``mit-han-lab/dlg``), inputs and logits drawn
from N(0, 1) in normalized space, no image prior and no box. Recovered labels are
``argmax softmax(z')``. iDLG (Sec. 3 of Zhao et al.) observes that for a single example the true
class is the only one with a negative last-layer gradient row sum, fixes the label from the update
(:mod:`fedsim.attacks.label_recovery`) and optimizes the image alone; with ``knowledge.labels: known`` both
variants use the granted labels.

**Budget.** ``budget.iterations`` counts closure evaluations (one forward and one double backward
each, the cost unit of an Adam step elsewhere), not ``LBFGS.step`` calls: the original's 300 calls of
up to 20 iterations each are about 6000 evaluations. ``max_iter`` iterations run per ``step`` call;
between calls the run checks the time limit, NaN and, with ``boxed``, projects onto the pixel box.
L-BFGS's own stopping tolerances are off (0): on a default-initialized model the gradients are so
small that torch's defaults stop it after a few dozen evaluations, far from the image. A strong-Wolfe
line search is the default; ``line_search: none`` is the original, which from 4 of 6 random starts
ended at 4-6 dB (600 evaluations, CIFAR-100, U(-0.5, 0.5) LeNet) where the search reached 13-16 dB
from all 6. L-BFGS can diverge to NaN: that restart fails; the attack fails only if every one does.
Restarts are ranked by their final gradient distance, never by ground truth; ``schedule`` (``{kind: full}`` or
``{kind: halving, ...}``, :mod:`fedsim.attacks.schedule`) runs them in full or by successive halving on that
distance, rungs counted in closure evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import gradient_distance, initial_inputs, pixel_box, to_pixels
from fedsim.attacks.matching import (
    DeltaScaled,
    LabelStrategy,
    examples_to_reconstruct,
    labels_for,
    matching_target,
    unusable,
)
from fedsim.attacks.objectives import OBJECTIVES, Distance
from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import (
    SCHEDULE_HELP,
    OnStep,
    ScheduleSpec,
    Sequential,
    Steps,
    planned_iterations,
    run_schedule,
    run_to_end,
    rungs,
)
from fedsim.attacks.victim import victim_model
from fedsim.errors import FedsimError
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction


def soft_gradient_distance(
    model: nn.Module, x: Tensor, targets: Tensor, target: list[Tensor], distance: Distance, create_graph: bool = True
) -> Tensor:
    """``D(m(x, targets), g*)``; ``targets`` are class indices (B,) or probabilities (B, K). The client's
    message ``m`` (a gradient, or a DIFF2 difference) is
    :func:`fedsim.attacks.inverting_gradients.gradient_distance`'s."""
    return gradient_distance(model, x, targets, target, distance, create_graph)


@dataclass(frozen=True)
class LbfgsRun:
    """One L-BFGS run: final inputs and label logits (``None`` when labels were fixed)."""

    x: Tensor
    logits: Tensor | None
    evaluations: int
    stopped: Literal["time limit", "non-finite loss", "converged"] | None = None


def lbfgs_steps(
    loss_fn: Callable[[Tensor, Tensor | None], Tensor],
    x0: Tensor,
    logits0: Tensor | None,
    *,
    evaluations: int,
    lr: float = 1.0,
    max_iter: int = 20,
    history_size: int = 100,
    line_search: Literal["none", "strong_wolfe"] = "strong_wolfe",
    box: tuple[Tensor, Tensor] | None = None,
    deadline: float | None = None,
    on_eval: Callable[[int], None] | None = None,
) -> Steps[LbfgsRun]:
    """Minimize ``loss_fn(x, logits)`` over ``x`` (and ``logits`` unless ``None``) with L-BFGS.

    Runs ``LBFGS.step`` with ``max_iter`` iterations per call until ``evaluations`` closure calls
    (capped per call, so the count is exact without a line search; a strong-Wolfe search may add up
    to 25). Stops early on the deadline, on a NaN/inf loss or iterate, or at convergence (a call that
    only evaluated the starting point). ``on_eval(n)`` runs after the n-th evaluation. Yields ``(evaluations,
    LbfgsRun so far)`` after every ``LBFGS.step`` call and returns the final run (the restart protocol of
    :mod:`fedsim.attacks.schedule`); :func:`lbfgs_inputs` runs it to the end.
    """
    x = x0.detach().clone().requires_grad_(True)
    logits = None if logits0 is None else logits0.detach().clone().requires_grad_(True)
    variables = [x] if logits is None else [x, logits]
    opt = torch.optim.LBFGS(variables, lr=lr, max_iter=max_iter, history_size=history_size,
                            line_search_fn=None if line_search == "none" else line_search,
                            tolerance_grad=0.0, tolerance_change=0.0)
    count, last = 0, math.inf

    def closure() -> Tensor:
        nonlocal count, last
        loss = loss_fn(x, logits)
        for v, g in zip(variables, torch.autograd.grad(loss, variables), strict=True):
            v.grad = g
        count += 1
        last = loss.item()
        if on_eval is not None:
            on_eval(count)
        return loss.detach()

    stopped: Literal["time limit", "non-finite loss", "converged"] | None = None
    while count < evaluations:
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time limit"
            break
        left, before = evaluations - count, count
        opt.param_groups[0].update(max_iter=min(max_iter, left), max_eval=min(max_iter * 5 // 4, left))
        opt.step(closure)
        if not math.isfinite(last) or not all(bool(torch.isfinite(v).all()) for v in variables):
            stopped = "non-finite loss"
            break
        if box is not None:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
        if count - before <= 1 and count < evaluations:
            stopped = "converged"
            break
        yield count, LbfgsRun(x.detach(), None if logits is None else logits.detach(), count)
    return LbfgsRun(x.detach(), None if logits is None else logits.detach(), count, stopped)


def lbfgs_inputs(
    loss_fn: Callable[[Tensor, Tensor | None], Tensor],
    x0: Tensor,
    logits0: Tensor | None,
    **options: Any,
) -> LbfgsRun:
    """:func:`lbfgs_steps` run to the end (same arguments)."""
    return run_to_end(lbfgs_steps(loss_fn, x0, logits0, **options))


class DLGParams(AttackParams):
    lr: float = Field(1.0, gt=0, description="L-BFGS step size (DLG: 1)")
    distance: Literal["l2", "cosine", "l1"] = Field("l2", description="gradient distance (DLG: squared L2)")
    max_iter: int = Field(20, ge=1, description="L-BFGS iterations per step() call (torch default, as DLG)")
    history_size: int = Field(100, ge=1, description="L-BFGS curvature memory")
    line_search: Literal["none", "strong_wolfe"] = Field(
        "strong_wolfe", description="strong-Wolfe line search (robust); 'none' is the DLG original"
    )
    boxed: bool = Field(False, description="project onto the pixel box after every step() call")
    init: Literal["randn", "rand", "zeros"] = "randn"
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)


@register_attack("dlg")
class DeepLeakage(DeltaScaled, Attack):
    """DLG: joint L-BFGS over dummy images and soft labels, squared-L2 gradient distance.

    FedAvg updates are matched as ``-delta / (lr * E)`` (exact for one local step), which needs the
    local hyperparameters for the scale-sensitive distances (``l2``, ``l1``); ``cosine`` does not.
    """

    summary = "DLG (Zhu et al. 2019): L-BFGS over dummy images and soft labels, L2 gradient matching"
    Params = DLGParams
    threat_model = "A"  # the SoK's letter for Zhu et al. 2019 (C when it rescales a FedAvg delta: threat_model_for)
    assumes = ("the global model sent to the client (the server built it)",
               "the number of examples from the update's metadata")
    matches_differences = True  # dummy messages via gradient_distance (fedsim.attacks.differences)
    #: Optimize soft labels with the images (DLG) or fix them from the update first (iDLG).
    joint_labels: ClassVar[bool] = True


    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        p, budget = self.params, self.budget
        num, k = examples_to_reconstruct(update), update.task.num_classes
        joint = self.joint_labels and self.knowledge.labels != "known"
        distance = OBJECTIVES[p.distance]
        try:
            model = victim_model(update, self.device)
            target = matching_target(update, model, rescale=p.distance != "cosine")
            fixed = None if joint else labels_for(
                update, num, known=self.knowledge.labels == "known",
                strategy=getattr(p, "label_strategy", "auto"), model=model,
            ).to(self.device)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))

        def targets(logits: Tensor | None) -> Tensor:
            return fixed if logits is None else torch.softmax(logits, dim=-1)

        def loss_fn(x: Tensor, logits: Tensor | None) -> Tensor:
            return soft_gradient_distance(model, x, targets(logits), target, distance)

        box = pixel_box(update.task.mean, update.task.std, self.device) if p.boxed else None
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        book: RestartBook[LbfgsRun] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[LbfgsRun]:
            gen = torch_generator(self.seed, "dlg", restart)
            x0 = initial_inputs(p.init, (num, *update.task.input_shape), gen).to(self.device)
            z0 = torch.randn((num, k), generator=gen).to(self.device) if joint else None
            return lbfgs_steps(loss_fn, x0, z0, evaluations=budget.iterations, lr=p.lr, max_iter=p.max_iter,
                               history_size=p.history_size, line_search=p.line_search, box=box, deadline=deadline,
                               on_eval=on_step)

        def score(_restart: int, run: LbfgsRun) -> float:  # restarts are ranked by the gradient distance alone
            return soft_gradient_distance(model, run.x, targets(run.logits), target, distance, False).item()

        plan = rungs(p.schedule, budget.restarts, budget.iterations)
        cohort = Sequential(start_restart, score, lambda run: run.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress, planned=planned_iterations(plan))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds, diverged="the loss became NaN/inf (L-BFGS diverged)")
        run = book.best
        labels = fixed if run.logits is None else run.logits.argmax(dim=-1)
        stats = {**book.stats(), **schedule, "iterations": float(run.evaluations),
                 "converged": float(run.stopped == "converged"), "seconds": seconds}
        return Reconstruction(to_pixels(run.x, update.task.mean, update.task.std), labels.cpu(), stats)


@register_attack("idlg")
class ImprovedDeepLeakage(DeepLeakage):
    """iDLG: DLG with the labels fixed from the update (or granted), then L-BFGS over images only."""

    summary = "iDLG (Zhao et al. 2020): labels from the last-layer gradient, then DLG's L-BFGS on images"
    assumes = (*DeepLeakage.assumes, "labels read from the last layer's gradient (exact at batch 1)")
    joint_labels = False

    class Params(DLGParams):
        label_strategy: LabelStrategy = Field(
            "idlg", description="iDLG's argmin row sum (exact at batch 1); 'auto' counts repeated labels"
        )
