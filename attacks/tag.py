"""TAG: Gradient Attack on Transformer-based Language Models (Deng, Wang, Li, Wang, Shang, Liu, Rajasekaran, Ding;
Findings of EMNLP 2021).

TAG is DLG (:mod:`fedsim.attacks.dlg`) for transformers: it optimizes a dummy input so that its gradient matches the one
the client sent, with the distance (Sec. 3 of the paper)

    D(g', g) = ||g' - g||_2^2 + alpha ||g' - g||_1,      alpha = 0.01,

summed over every parameter tensor, minimised with Adam. Text is discrete, so the dummy input is relaxed: logits
``Z`` (B, T, V) over the vocabulary, and the model reads ``softmax(Z)`` as a (B, T, V) distribution (fedsim's
text models embed it as ``softmax(Z) @ W_emb``, :mod:`fedsim.models.transformer`; a one-hot row is a real token).
The recovered tokens are ``argmax_v Z`` (K = B sequences, in no particular order: the evaluator matches them).

- ``language_modeling`` (gpt): the targets are the relaxed inputs themselves, shifted: the soft next-token
  cross-entropy ``-sum_v softmax(Z)[b, t+1, v] log p_model(v | softmax(Z)[b, :t+1])``, mean over the B (T - 1)
  predictions, which is :func:`fedsim.training.lm_loss` when the rows are one-hot. Soft targets (not argmax) keep
  the targets differentiable in Z, so the LM head's gradient, which carries the next tokens, steers Z too.
- ``classification`` (bert): the labels are granted (``knowledge.labels: known``) or read from the classifier
  bias's gradient (:mod:`fedsim.attacks.label_recovery`, strategy ``auto`` from the update alone), then fixed, as iDLG.

Restarts (``budget.restarts``, from independent Z draws) are ranked by their final gradient distance only
(:class:`fedsim.attacks.restarts.RestartBook`), fully or by successive halving (``schedule``,
:mod:`fedsim.attacks.schedule`). FedAvg updates are matched as ``-delta / (lr * steps)`` (exact for one
local plain-SGD step; :func:`fedsim.attacks.matching.matching_target`), which needs ``knowledge.local_hparams`` unless
``distance: cosine``. The paper's per-layer weighting of the L1 term is not specified precisely; like breaching's
``EuclideanTag`` reading it is optional here and off (uniform alpha).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.matching import DeltaScaled, examples_to_reconstruct, labels_for, matching_target, unusable
from fedsim.attacks.objectives import cosine, l1, l2
from fedsim.attacks.restarts import NON_FINITE, TIME_LIMIT, RestartBook
from fedsim.attacks.schedule import (
    SCHEDULE_HELP,
    OnStep,
    ScheduleSpec,
    Sequential,
    Steps,
    planned_iterations,
    run_schedule,
    rungs,
)
from fedsim.attacks.victim import victim_model
from fedsim.errors import FedsimError
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction


def soft_lm_loss(logits: Tensor, probs: Tensor) -> Tensor:
    """Next-token cross-entropy against soft targets: ``logits`` (B, T, V) predict the rows ``probs`` (B, T, V)
    one position later; mean over the B (T - 1) predictions (= :func:`fedsim.training.lm_loss` for one-hot rows)."""
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    return -(probs[:, 1:] * logp).sum(dim=-1).mean()


def tag_distance(dummy: list[Tensor], target: list[Tensor], alpha: float) -> Tensor:
    """TAG's ``||g' - g||_2^2 + alpha ||g' - g||_1`` over all parameter tensors."""
    return l2(dummy, target) + alpha * l1(dummy, target)


@dataclass(frozen=True)
class Relaxed:
    """One restart's result: the final logits Z (B, T, V), how many Adam steps ran and why it stopped early."""

    logits: Tensor
    iterations: int
    stopped: str | None = None


class TAGParams(AttackParams):
    lr: float = Field(0.1, gt=0, description="Adam step size on the token logits Z")
    alpha: float = Field(0.01, ge=0, description="weight of the L1 term (TAG: 0.01)")
    distance: Literal["tag", "cosine"] = Field(
        "tag", description="tag: ||g'-g||_2^2 + alpha ||g'-g||_1 (the paper); cosine: scale-free (FedAvg without lr)"
    )
    init_scale: float = Field(1.0, gt=0, description="standard deviation of the initial logits Z ~ N(0, s^2)")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)


@register_attack("tag")
class TAG(DeltaScaled, Attack):
    """TAG: Adam over relaxed token logits, L2 + alpha L1 gradient matching; tokens = argmax."""

    summary = "TAG (Deng et al. 2021): Adam over softmax-relaxed tokens, L2 + 0.01 L1 gradient matching (text)"
    Params = TAGParams
    inputs = ("tokens",)
    # The SoK (Carletti et al. 2025) tabulates image attacks only; TAG is DLG's objective (letter A) on text, and
    # like DLG it rises to C when it rescales a FedAvg delta by the granted local hyperparameters (DeltaScaled).
    threat_model = "A"
    assumes = ("the global model sent to the client (the server built it) and its tokenizer's vocabulary",
               "the number of examples from the update's metadata",
               "classification: labels read from the classifier bias's gradient (or granted)")

    def _loss_fn(self, model: nn.Module, update: ClientUpdate, labels: Tensor | None, target: list[Tensor]):  # noqa: ANN202
        params = [p for p in model.parameters()]
        alpha, use_cosine = self.params.alpha, self.params.distance == "cosine"

        def loss_fn(z: Tensor, create_graph: bool = True) -> Tensor:
            probs = torch.softmax(z, dim=-1)
            out = model(probs)
            task = soft_lm_loss(out, probs) if labels is None else F.cross_entropy(out, labels)
            grads = list(torch.autograd.grad(task, params, create_graph=create_graph))
            return cosine(grads, target) if use_cosine else tag_distance(grads, target, alpha)

        return loss_fn

    def _optimize(self, loss_fn, z0: Tensor, deadline: float | None, on_step) -> Steps[Relaxed]:  # noqa: ANN001
        """Adam on the logits, one step at a time (the restart protocol of :mod:`fedsim.attacks.schedule`)."""
        z = z0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.params.lr)
        for step in range(self.budget.iterations):
            if deadline is not None and time.perf_counter() > deadline:
                return Relaxed(z.detach(), step, TIME_LIMIT)
            loss = loss_fn(z)
            if not torch.isfinite(loss):
                return Relaxed(z.detach(), step, NON_FINITE)
            (z.grad,) = torch.autograd.grad(loss, [z])
            opt.step()
            on_step(step + 1)
            yield step + 1, Relaxed(z.detach(), step + 1)
        return Relaxed(z.detach(), self.budget.iterations)

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        task = update.task
        if not task.is_text or len(task.input_shape) != 1:
            return Reconstruction.failure(f"TAG reconstructs token sequences; the {task.dataset} data are not text")
        if task.kind not in ("language_modeling", "classification"):
            return Reconstruction.failure(f"TAG attacks language modeling or classification, not {task.kind!r}")
        num, (seq_len,), vocab = examples_to_reconstruct(update), task.input_shape, task.vocab_size
        try:
            model = victim_model(update, self.device)
            target = matching_target(update, model, rescale=self.params.distance != "cosine")
            labels = None if task.kind == "language_modeling" else labels_for(
                update, num, known=self.knowledge.labels == "known", strategy="auto", model=None,  # type: ignore[arg-type]
            ).to(self.device)  # model=None: the bias rule from the update alone (its probe feeds no token ids)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        loss_fn = self._loss_fn(model, update, labels, target)
        budget = self.budget
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        book: RestartBook[Relaxed] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[Relaxed]:
            gen = torch_generator(self.seed, "tag", restart)
            z0 = (self.params.init_scale * torch.randn((num, seq_len, vocab), generator=gen)).to(self.device)
            return self._optimize(loss_fn, z0, deadline, on_step)

        def score(_restart: int, run: Relaxed) -> float:  # the gradient distance alone
            return loss_fn(run.logits, create_graph=False).item()

        spec = self.params.schedule
        cohort = Sequential(start_restart, score, lambda run: run.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(spec, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(spec, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds)
        run = book.best
        stats = {**book.stats(), **schedule, "iterations": float(run.iterations), "seconds": seconds}
        tokens = run.logits.argmax(dim=-1).to("cpu", torch.int64)
        return Reconstruction(images=None, labels=None if labels is None else labels.cpu(), stats=stats,
                              tokens=tokens, token_set=None)
