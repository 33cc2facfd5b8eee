"""Batched trials: K independent restarts of a gradient-matching attack as one computation.

A trial minimizes its own loss ``loss_fn(x_k)`` over its own dummy batch ``x_k`` (shape (B, C, H, W)).
The K batches are stacked into one tensor of shape (K, B, C, H, W) and

    torch.func.vmap(torch.func.grad_and_value(loss_fn))

returns every trial's loss and input gradient in one call. ``vmap`` keeps per-trial semantics: each
trial's forward pass, parameter gradient (a per-trial "per-sample" gradient, from
:func:`parameter_gradient`) and distance see only that trial's batch, so B >= 1 works, and so does
BatchNorm in train mode (each trial is normalized with its own batch statistics, exactly as when it
runs alone; the running-statistics update, a side effect that cannot be batched, is switched off in a
copy of the model, see :func:`stateless_model`).

The optimizer is one ``torch.optim.Adam`` over the stacked tensor (not the written-out
:class:`fedsim.attacks.input_adam.InputAdam` of the sequential path: ``vmap`` imports ``torch._dynamo``
anyway, so it would save no start-up; on the CPU both are torch's single-tensor arithmetic, on CUDA
torch's default is its foreach kernel). Adam, the sign of the gradient, the box
projection and the step schedule are all elementwise, so this is exactly K independent Adams with
their own moments, started together. A trial whose loss turns NaN/inf is frozen at its last finite
iterate (as the sequential run returns it) while the others go on. The vmapped kernels round
differently from the plain ones (last-ulp differences): with plain Adam the trials match the
sequential ones to ~1e-5, but the sign of the gradient (signed Adam), or Adam's own normalization
of near-zero gradients, turns such differences into full steps, so single pixels can drift apart
over hundreds of steps while the reconstruction quality stays the same (see the tests).

Losses that ``vmap`` cannot batch (an operator without a batching rule, Python control flow on a
tensor's value, random draws) fail on the first evaluation, which raises :class:`BatchingUnsupported`
so the caller can run the trials one after another instead.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from fedsim.attacks.differences import functional_message, message_of
from fedsim.attacks.schedule import keep_rows

Stopped = Literal["time limit", "non-finite loss"] | None
T = TypeVar("T")


class BatchingUnsupported(RuntimeError):
    """The per-trial loss cannot be evaluated under ``vmap``; run the trials sequentially."""


@dataclass(frozen=True)
class TrialsResult:
    """K trials: final inputs stacked on dim 0, steps each ran, and why each stopped early if it did."""

    x: Tensor
    iterations: tuple[int, ...]
    stopped: tuple[Stopped, ...]


def stateless_model(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it in which train-mode BatchNorm layers keep no running statistics.

    In train mode BatchNorm normalizes with the batch's own statistics, so its output is unchanged;
    only the in-place running-statistics update, which ``vmap`` cannot batch, goes. Eval-mode BatchNorm
    reads its running statistics without writing them, which batches fine, so it is left alone.
    """
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not any(m.training and m.track_running_stats for m in bn):
        return model
    clone = copy.deepcopy(model)
    for layer in clone.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None
            layer.track_running_stats = False
    return clone


def parameter_gradient(model: nn.Module) -> Callable[[Tensor, Tensor], list[Tensor]]:
    """``(x, labels) -> the client's message for batch x``, one tensor per ``model.parameters()`` entry.

    Written with ``torch.func`` (``functional_call`` + ``grad``), so it composes with ``vmap`` over
    trials and with an outer ``grad`` over ``x`` (double backward). For a plain update it is the
    gradient of the mean cross-entropy, the loss a FedSGD client differentiates; when the model carries
    a DIFF2 message (:func:`fedsim.attacks.differences.message_of`: a reference model, per-sample clipping) it
    is that gradient difference (:func:`fedsim.attacks.differences.functional_message`). The model's current
    parameters and mode are captured.
    """
    return functional_message(stateless_model(model), message_of(model))


def matching_loss(
    model: nn.Module,
    labels: Tensor,
    target: Sequence[Tensor],
    distance: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor],
    transform: Callable[[Sequence[Tensor]], Sequence[Tensor]] | None = None,
    prior: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """One trial's gradient-matching loss ``D(T(grad_theta CE(f(x), y)), g*) + prior(x)``, in
    ``torch.func`` form for :func:`optimize_trials` (``T``: e.g. a defense-aware transform)."""
    gradient = parameter_gradient(model)

    def loss(x: Tensor) -> Tensor:
        dummy = gradient(x, labels)
        value = distance(transform(dummy) if transform is not None else dummy, target)
        return value + prior(x) if prior is not None else value

    return loss


def _freeze(x: Tensor, before: Tensor, active: Tensor) -> None:
    """Put back the rows of the trials that are no longer active (in place)."""
    keep = active.view(-1, *([1] * (x.dim() - 1)))
    x.copy_(torch.where(keep, x, before))


class BatchedTrials(Generic[T]):
    """K trials as one vmapped computation, advanced rung by rung (a :class:`fedsim.attacks.schedule.Cohort`).

    The state of :func:`optimize_trials` kept between calls: the stacked inputs, one Adam over them and the
    step schedule (a function of the step index in ``iterations``, shared by all trials). ``advance(members,
    until)`` with fewer members than are alive keeps only their rows: of the inputs and of Adam's moments, copied
    exactly (Adam is elementwise). The survivors' loss and gradient are then computed on a smaller batch: on the
    CPU that gave bitwise the unpruned run's iterates in the tests (an elementwise and a convolution loss), but a
    backend that picks its kernels by batch size (cuDNN's algorithm choice) may round differently, so in general
    a survivor goes on as if nothing had been dropped up to float rounding (which signed Adam can turn into single
    pixels drifting apart, as between batched and sequential trials). ``iterations_spent`` counts the steps of
    active rows only (a frozen, diverged trial runs no more). ``wrap(x, iterations,
    stopped)`` builds a result; ``score(result)`` is its matching loss. Progress: ``progress(iterations spent
    over all trials, planned)`` every ``every`` steps and at the last. Raises :class:`BatchingUnsupported`
    when the first batched evaluation fails.
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor], Tensor],
        x0: Tensor,
        *,
        iterations: int,
        lr: float,
        signed: bool = True,
        box: tuple[Tensor, Tensor] | None = None,
        decay: Literal["step", "none"] = "step",
        deadline: float | None = None,
        wrap: Callable[[Tensor, int, Stopped], T],
        score: Callable[[T], float] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.step_fn = vmap(grad_and_value(loss_fn))
        self.iterations, self.signed, self.box, self.deadline = iterations, signed, box, deadline
        self.wrap, self.score_of, self.on_step = wrap, score, on_step
        trials = x0.shape[0]
        self.x = x0.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr)
        milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay == "step" else []
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=0.1)
        self.rows = list(range(trials))  # member of each row of x
        self.done: list[int | None] = [None] * trials  # steps run, once a trial stopped or was dropped
        self.stopped: list[Stopped] = [None] * trials
        self.final: dict[int, Tensor] = {}
        self.active = torch.ones(trials, dtype=torch.bool, device=self.x.device)
        self.step, self._spent = 0, 0
        self._scores: dict[int, tuple[int, float]] = {}

    def _keep(self, members: Sequence[int]) -> None:
        """Keep only the rows of ``members``: inputs, Adam moments and the active flags."""
        index = [self.rows.index(m) for m in members]
        for row, m in enumerate(self.rows):
            if m not in members:
                self.final[m] = self.x.detach()[row].clone()
                if self.done[m] is None:
                    self.done[m] = self.step
        self.active = self.active[torch.tensor(index, device=self.active.device)]
        self.x, self.rows = keep_rows(self.opt, self.x, index), list(members)

    def advance(self, members: Sequence[int], until: int) -> bool:
        """Run ``members`` (a subset of the alive ones, ascending) to step ``until``; False past the deadline."""
        if list(members) != self.rows:
            self._keep(members)
        x = self.x
        while self.step < min(until, self.iterations):
            step = self.step
            if self.deadline is not None and time.perf_counter() > self.deadline:
                for k in self.active.nonzero().flatten().tolist():
                    self.done[self.rows[k]], self.stopped[self.rows[k]] = step, "time limit"
                return False
            try:
                gradient, loss = self.step_fn(x.detach())
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
                if step == 0:
                    raise BatchingUnsupported(f"{type(err).__name__}: {err}") from err
                raise
            finite = torch.isfinite(loss.detach())
            for k in (self.active & ~finite).nonzero().flatten().tolist():
                self.done[self.rows[k]], self.stopped[self.rows[k]] = step, "non-finite loss"
            self.active = active = self.active & finite
            if not bool(active.any()):
                break
            before = None if bool(active.all()) else x.detach().clone()
            x.grad = gradient.sign() if self.signed else gradient
            self.opt.step()
            self.sched.step()
            with torch.no_grad():
                if self.box is not None:
                    x.copy_(torch.maximum(torch.minimum(x, self.box[1]), self.box[0]))
                if before is not None:
                    _freeze(x, before, active)
            self.step += 1
            self._spent += int(active.sum())  # frozen (diverged) rows ran no step
            if self.on_step is not None:
                self.on_step(self.step, self._spent)
        return True

    def started(self, i: int) -> bool:
        return True

    def result(self, i: int) -> tuple[T, Stopped]:
        x = self.final[i] if i in self.final else self.x.detach()[self.rows.index(i)]
        done = self.done[i]
        return self.wrap(x, self.step if done is None else done, self.stopped[i]), self.stopped[i]

    def score(self, i: int) -> float:
        if self.score_of is None:
            raise ValueError("BatchedTrials was built without a score function")
        cached = self._scores.get(i)
        if cached is None or cached[0] != self.step:
            result, stopped = self.result(i)
            cached = self._scores[i] = (self.step, math.nan if stopped == "non-finite loss" else self.score_of(result))
        return cached[1]

    def drop(self, members: Sequence[int]) -> None:
        """Nothing to do until the next :meth:`advance` keeps the survivors' rows."""

    def spent(self) -> int:
        return self._spent


def optimize_trials(
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
) -> TrialsResult:
    """Minimize ``loss_fn(x0[k])`` for every trial k at once; the batched twin of ``optimize_inputs``.

    ``loss_fn`` maps ONE trial's inputs to a scalar and must be ``torch.func``-compatible (model
    gradients via :func:`parameter_gradient`, no ``.item()`` or Python branches on tensor values).
    ``signed``, ``box`` (lower, upper; broadcast against one trial's inputs), ``decay`` ("step": lr x0.1
    at 3/8, 5/8, 7/8 of ``iterations``), ``deadline`` (a ``time.perf_counter()`` value: all trials stop)
    and ``on_step(i)`` (after step i, 1-based) behave as in ``optimize_inputs``. Raises
    :class:`BatchingUnsupported` when the first batched evaluation fails. (All K trials to the end: the
    ``full`` schedule of :class:`BatchedTrials`.)
    """
    trials = BatchedTrials(loss_fn, x0, iterations=iterations, lr=lr, signed=signed, box=box, decay=decay,
                           deadline=deadline, wrap=lambda x, n, s: (x, n, s),
                           on_step=None if on_step is None else (lambda i, _spent: on_step(i)))
    trials.advance(list(range(x0.shape[0])), iterations)
    out = [trials.result(k)[0] for k in range(x0.shape[0])]
    return TrialsResult(torch.stack([x for x, _, _ in out]), tuple(n for _, n, _ in out), tuple(s for _, _, s in out))
