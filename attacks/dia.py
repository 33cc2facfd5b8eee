"""Dropout Inversion Attack, DIA (Scheliga, Mäder, Seeland, "Dropout is NOT All You Need to Prevent
Gradient Leakage", AAAI 2023), and its oracle upper bound, WIIG.

A client that trains with dropout computes its gradient ``g*`` through a randomly thinned network:
every dropout layer ``l`` draws a Bernoulli(1 - p) mask ``M*_l`` of its activation's full shape. An
attacker that inverts the deterministic network (Inverting Gradients in attacker mode, dropout =
identity) matches the wrong function and fails. DIA models the masks instead: it jointly optimizes
the dummy input ``x`` and one continuous mask ``m_l in [0, 1]^{shape_l}`` per dropout layer, applied
as ``h * m_l / (1 - p)`` (:meth:`~fedsim.models.MaskDropout.set_mask`), minimizing

    D_cos(grad_theta CE(f_{theta,m}(x), y), g*) + 1e-5 * TV(x) + 1e-4 * sum_l |(1 - mean(m_l)) - p_l|,

with Adam (lr 0.1) on all variables, the sign applied only to the input gradient, ``x`` projected
onto the pixel box and the masks onto [0, 1] after every step, ReduceLROnPlateau (x0.1) on the loss,
early stopping, and the best iterate by gradient loss returned (spec: ``reference/algorithms.md``
section 2). Masks start from Bernoulli(1 - p) samples of the attack's own generator; their shapes
come from one forward pass of the dummy batch. ``p`` is public: it is read from the rebuilt global
model's dropout layers (the model spec, or the dropout defense's public transform). Without dropout
(no layer, or p = 0) no mask is optimized and DIA is Inverting Gradients with this optimizer.

``dia_oracle`` (the paper's WIIG) runs the same optimization with the client's *true* masks fixed:
the upper bound DIA approaches. It reads them from ``side_info["oracle_masks"]``, a channel the
runner fills only when the threat model sets ``knowledge.oracle_masks: true``; the runner, having
handed over ground truth, labels every outcome of that attack spec oracle. DIA itself never reads
that channel.

Restarts (``budget.restarts``) are ranked by their best gradient loss, never by ground truth, and scheduled by
``schedule`` (:mod:`fedsim.attacks.schedule`): in full (default), or by successive halving on that loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import gradient_distance, initial_inputs, pixel_box, to_pixels
from fedsim.attacks.label_recovery import LABEL_STRATEGIES
from fedsim.attacks.matching import examples_to_reconstruct, labels_for, unusable
from fedsim.attacks.objectives import cosine
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import NON_FINITE, RestartBook
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
from fedsim.attacks.victim import target_gradient, victim_model
from fedsim.errors import FedsimError
from fedsim.models import dropout_layers, set_masks
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction

PROGRESS_EVERY = 50
PAPER_ITERATIONS = 20_000  # the paper's budget, for which its patience values (800, 4000) were chosen
LossFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (total loss, gradient-matching loss)


@dataclass(frozen=True)
class MaskedTrial:
    """The best iterate of one run (by gradient loss), how many steps ran, and why it stopped."""

    x: Tensor
    masks: dict[str, Tensor]
    grad_loss: float
    iterations: int
    stopped: Literal["converged", "no improvement", "time limit", "non-finite loss"] | None = None


def mask_shapes(model: nn.Module, x: Tensor) -> dict[str, torch.Size]:
    """The activation shape at every dropout layer of ``model`` for input ``x`` (one forward pass)."""
    shapes: dict[str, torch.Size] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            shapes[name] = inputs[0].shape

        return record

    hooks = [layer.register_forward_hook(hook(name)) for name, layer in dropout_layers(model).items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def initial_masks(shapes: Mapping[str, torch.Size], ps: Mapping[str, float], gen: torch.Generator) -> dict[str, Tensor]:
    """Bernoulli(1 - p_l) samples of each layer's shape, drawn on the CPU from ``gen``."""
    return {k: torch.bernoulli(torch.full(tuple(s), 1.0 - ps[k]), generator=gen) for k, s in shapes.items()}


def mask_prior(masks: Mapping[str, Tensor], ps: Mapping[str, float]) -> Tensor:
    """``sum_l |(1 - mean(m_l)) - p_l|``: each mask should drop about a fraction p of its units."""
    return sum(((1.0 - m.mean()) - ps[name]).abs() for name, m in masks.items())  # type: ignore[return-value]


def input_and_mask_steps(
    loss_fn: LossFn,
    x0: Tensor,
    masks: dict[str, Tensor],
    *,
    iterations: int,
    lr: float,
    box: tuple[Tensor, Tensor] | None,
    patience: int,
    stop_after: int,
    stop_below: float = 1e-5,
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Steps[MaskedTrial]:
    """Minimize ``loss_fn(x)`` over ``x`` and, in place, the leaf tensors in ``masks`` (DIA, Sec. 4).

    ``masks`` must already be imposed on the model (the loss reads them by reference); tensors that do
    not require grad stay fixed (the oracle). Adam on all variables, sign of the gradient for ``x``
    only; ``x`` projected onto ``box`` and masks onto [0, 1] after each step; ReduceLROnPlateau (x0.1,
    ``patience``) on the total loss. Stops when the total loss falls below ``stop_below``, when the
    gradient loss has not improved for ``stop_after`` steps, past ``deadline`` or on a NaN/inf loss.
    Returns the iterate with the lowest gradient loss seen; yields ``(i, that iterate so far)`` after step ``i``
    (the restart protocol of :mod:`fedsim.attacks.schedule`; :func:`optimize_inputs_and_masks` runs it to the end).
    """
    x = x0.detach().clone().requires_grad_(True)
    free = [m for m in masks.values() if m.requires_grad]
    opt = torch.optim.Adam([x, *free], lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=patience)
    best_loss, best_x, best_masks, best_step = math.inf, x.detach().clone(), {}, 0
    stopped: Any = None
    step = 0
    for step in range(iterations):
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time limit"
            break
        loss, grad_loss = loss_fn(x)
        if not (torch.isfinite(loss) and torch.isfinite(grad_loss)):
            stopped = "non-finite loss"
            break
        if grad_loss.item() < best_loss:
            best_loss, best_x, best_step = grad_loss.item(), x.detach().clone(), step
            best_masks = {k: m.detach().clone() for k, m in masks.items()}
        if loss.item() < stop_below:
            stopped = "converged"
            break
        if step - best_step >= stop_after:
            stopped = "no improvement"
            break
        grads = torch.autograd.grad(loss, [x, *free], allow_unused=True)
        x.grad = grads[0].sign()
        for m, g in zip(free, grads[1:], strict=True):
            m.grad = torch.zeros_like(m) if g is None else g
        opt.step()
        sched.step(loss.item())
        with torch.no_grad():
            if box is not None:
                x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
            for m in free:
                m.clamp_(0.0, 1.0)
        if on_step is not None:
            on_step(step + 1)
        yield step + 1, MaskedTrial(best_x, best_masks, best_loss, step + 1)
    else:
        step = iterations
    if not best_masks:
        best_masks = {k: m.detach().clone() for k, m in masks.items()}
    return MaskedTrial(best_x, best_masks, best_loss, step, stopped)


def optimize_inputs_and_masks(loss_fn: LossFn, x0: Tensor, masks: dict[str, Tensor], **options: Any) -> MaskedTrial:
    """:func:`input_and_mask_steps` run to the end (same arguments)."""
    return run_to_end(input_and_mask_steps(loss_fn, x0, masks, **options))


class _MaskError(Exception):
    """A restart's masks could not be built (the reason is the message)."""


class _DIAParams(AttackParams):
    lr: float = Field(0.1, gt=0, description="Adam step size on the inputs and the masks")
    tv: float = Field(1e-5, ge=0, description="weight of the mean-form total variation prior")
    init: Literal["randn", "rand", "zeros"] = "randn"
    patience: int | None = Field(None, ge=1, description="ReduceLROnPlateau patience (default 800 per 20k steps)")
    early_stop: int | None = Field(None, ge=1, description="stop after N steps without improvement (4000/20k)")
    stop_below: float = Field(1e-5, ge=0, description="stop once the loss is below this")
    label_strategy: str = Field("auto", description="label inference when labels are not known")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

    @field_validator("label_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in LABEL_STRATEGIES:
            raise ValueError(f"unknown label strategy {value!r} (known: {', '.join(LABEL_STRATEGIES)})")
        return value


class _MaskedInversion(Attack):
    """Shared driver: threat-model inputs, restarts, budget; subclasses say where the masks come from."""

    Params = _DIAParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_trial: MaskedTrial | None = None  # the returned run, masks included (for analysis)

    def _masks(self, update: ClientUpdate, model: nn.Module, x0: Tensor, restart: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _labels(self, update: ClientUpdate, num: int, model: nn.Module) -> Tensor:
        return labels_for(update, num, known=self.knowledge.labels == "known",
                          strategy=self.params.label_strategy, model=model)

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        p, budget = self.params, self.budget
        num, iters = examples_to_reconstruct(update), budget.iterations
        try:
            model = victim_model(update, self.device)
            target = target_gradient(update, model)
            labels = self._labels(update, num, model).to(self.device)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        ps = {name: layer.p for name, layer in dropout_layers(model).items()}
        box = pixel_box(update.task.mean, update.task.std, self.device)
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        patience = p.patience or max(10, iters * 800 // PAPER_ITERATIONS)
        stop_after = p.early_stop or max(50, iters * 4000 // PAPER_ITERATIONS)
        restart_masks: dict[int, dict[str, Tensor]] = {}

        def start_restart(restart: int, on_step: OnStep) -> Steps[MaskedTrial]:
            gen = torch_generator(self.seed, "dia", restart)
            x0 = initial_inputs(p.init, (num, *update.task.input_shape), gen).to(self.device)
            try:
                masks = restart_masks[restart] = self._masks(update, model, x0, restart)
            except (KeyError, ValueError) as err:
                raise _MaskError(str(err).strip("'\"")) from err
            trainable = any(m.requires_grad for m in masks.values())
            weight = float(getattr(p, "mask_prior", 0.0)) if trainable else 0.0

            def loss_fn(x: Tensor) -> tuple[Tensor, Tensor]:
                grad_loss = gradient_distance(model, x, labels, target, cosine)
                loss = grad_loss + p.tv * total_variation(x) if p.tv > 0 else grad_loss
                return (loss + weight * mask_prior(masks, ps) if weight > 0 else loss), grad_loss

            return input_and_mask_steps(loss_fn, x0, masks, iterations=iters, lr=p.lr, box=box, patience=patience,
                                        stop_after=stop_after, stop_below=p.stop_below, deadline=deadline,
                                        on_step=on_step)

        def around(restart: int) -> Callable[[], None]:
            """Impose restart ``restart``'s masks on the shared model while it steps; the undo takes them off."""
            set_masks(model, restart_masks[restart])
            return lambda: set_masks(model, None)

        def stopped(trial: MaskedTrial) -> str | None:  # a run that diverged after a finite best keeps that best
            return None if trial.stopped == NON_FINITE and math.isfinite(trial.grad_loss) else trial.stopped

        book: RestartBook[MaskedTrial] = RestartBook()
        cohort = Sequential(start_restart, lambda _restart, trial: trial.grad_loss, stopped, iterations=iters,
                            deadline=deadline, progress=progress, around=around,
                            planned=planned_iterations(rungs(p.schedule, budget.restarts, iters)))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, iters, book)
        except _MaskError as err:
            return Reconstruction.failure(str(err))
        except (RuntimeError, ValueError, IndexError) as err:
            return Reconstruction.failure(f"optimization failed: {err}")
        finally:
            set_masks(model, None)
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds)
        best = book.best
        self.last_trial = best
        values = list(best.masks.values())
        stats = {
            **book.stats(),
            **schedule,
            "iterations": float(best.iterations),
            "early_stopped": float(best.stopped in ("converged", "no improvement")),
            "dropout_layers": float(len(values)),
            "mask_keep_rate": float(sum(m.sum() for m in values) / sum(m.numel() for m in values)) if values else 1.0,
            "seconds": seconds,
        }
        images = to_pixels(best.x, update.task.mean, update.task.std)
        return Reconstruction(images=images, labels=labels.cpu(), stats=stats)


@register_attack("dia")
class DropoutInversionAttack(_MaskedInversion):
    """DIA: jointly optimize the inputs and continuous dropout masks (Scheliga et al., AAAI 2023).

    Labels are inferred from the update unless the threat model grants them (the paper assumes
    known labels; the classifier bias gradient reveals them under dropout too). ``budget.restarts``
    independent runs (the paper: 1) are ranked by gradient loss.
    """

    summary = "Dropout Inversion Attack (Scheliga et al. 2023): optimizes the inputs and the dropout masks"
    #: Not in the SoK's tables; it is Inverting Gradients (B) that also optimizes the unknown dropout masks.
    threat_model = "B"
    assumes = ("the architecture's dropout layers and rates (the masks themselves are optimized)",)

    class Params(_DIAParams):
        mask_prior: float = Field(1e-4, ge=0, description="weight of sum_l |(1 - mean(m_l)) - p_l|")

    def _masks(self, update: ClientUpdate, model: nn.Module, x0: Tensor, restart: int) -> dict[str, Tensor]:
        ps = {name: layer.p for name, layer in dropout_layers(model).items() if layer.p > 0}
        shapes = {k: s for k, s in mask_shapes(model, x0).items() if k in ps}
        gen = torch_generator(self.seed, "dia-masks", restart)
        return {k: m.to(self.device).requires_grad_(True) for k, m in initial_masks(shapes, ps, gen).items()}


@register_attack("dia_oracle")
class DropoutOracle(_MaskedInversion):
    """WIIG: the DIA optimization on the inputs only, with the client's TRUE dropout masks imposed.

    An upper bound, not an attack: it needs ``knowledge.oracle_masks: true``, through which the
    runner hands over the recorded masks (``side_info["oracle_masks"]``, keyed ``mask/<layer name>``)
    and the runner labels every output ``oracle``. FedSGD only (FedAvg draws new masks at every local step).
    """

    summary = "WIIG oracle (Scheliga et al. 2023): Inverting Gradients with the client's true dropout masks"
    needs = {"oracle_masks": True}
    protocols = ("fedsgd",)
    #: B plus ground truth no threat model grants: the client's true dropout masks (outputs labelled oracle).
    threat_model = "B"
    assumes = ("ORACLE: the client's true dropout masks (knowledge.oracle_masks; an upper bound, not an attacker)",)

    def _masks(self, update: ClientUpdate, model: nn.Module, x0: Tensor, restart: int) -> dict[str, Tensor]:
        given = update.side_info.get("oracle_masks")
        if given is None:
            raise ValueError("dia_oracle needs knowledge.oracle_masks, but the update carries no masks")
        masks = {k.removeprefix("mask/"): torch.as_tensor(v).float().to(self.device) for k, v in given.items()}
        layers = dropout_layers(model)
        missing = sorted(k for k, layer in layers.items() if layer.p > 0 and k not in masks)
        unknown = sorted(set(masks) - set(layers))
        if missing or unknown:
            raise ValueError(f"oracle masks do not fit the dropout layers (missing {missing}, unknown {unknown})")
        return masks
