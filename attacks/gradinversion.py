"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov; CVPR 2021).

The paper's objective: over a group of K dummy batches ``x_k`` (normalized space),

    min_x  a_G D(grad_theta CE(f(x_k), y), g*) + R_fidelity(x_k) + a_grp R_group(x_k),
    R_fidelity = a_TV TV(x_k) + a_l2 |x_k|_2 + a_BN R_BN(x_k),

* ``R_BN`` (the DeepInversion prior): for every BatchNorm layer l, ``|mu_l(x_k) - mu_l|_2 +
  |sigma^2_l(x_k) - sigma^2_l|_2`` between the batch statistics of the layer's input and the
  global model's running statistics (public: they are in ``global_state``), the first layer
  weighted ``bn_first`` times (GIFD/breaching). It is used when ``knowledge.bn_stats: running``;
  validation refuses that where the statistics hold no data: a model without BatchNorm (as built:
  DP-SGD replaces it), FedSGD (buffers never aggregated) or an attack on round 1. With ``bn_stats:
  none`` the attack runs without it (every other term stays). ``bn_stats: client`` (the client's own
  batch statistics) is refused for every attack: updates carry none.
* ``R_group`` (group consistency): K seeds optimized together (``budget.restarts``), each pulled
  towards the detached group mean, ``|x_k - mean_k x_k|_2``. GIFD builds the mean at iteration 500
  of 15k and refreshes it every 100; for short budgets these are fractions ``group_start`` and
  ``group_every`` of ``budget.iterations``.

Adam (unsigned) with a linear warm-up and cosine decay, optional Langevin noise
``langevin * lr_t * N(0, 1)`` added to the input gradient, projection onto the pixel box. The
returned batch is the seed with the smallest gradient distance (never ground truth). Labels are
granted or inferred from the update (Yin: the B smallest per-row minima, ``label_strategy: yin``;
the default ``auto`` also handles repeated labels). ``budget.iterations`` are group steps; each step
costs K forward/double-backward passes, as K sequential restarts would, and progress is reported
in those passes (``iterations * restarts`` in all).

The defaults follow breaching/GIFD where they transfer (lr 0.1, first BN layer x10, a_grp 0.01,
a_l2 1e-6) and were measured for the rest on small CIFAR nets: the cosine distance (scale free; the
paper's L2 needs its weight tuned to the gradient's magnitude), a_TV = a_BN = 0.01. Budgets under
~1k iterations do better with lr 0.3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import gradient_distance, initial_inputs, pixel_box, to_pixels
from fedsim.attacks.matching import (
    LabelStrategy,
    check_delta_scale,
    delta_scale_letter,
    examples_to_reconstruct,
    labels_for,
    matching_target,
    ticker,
    unusable,
)
from fedsim.attacks.objectives import OBJECTIVES
from fedsim.attacks.regularizers import image_norm, total_variation
from fedsim.attacks.victim import victim_model
from fedsim.errors import FedsimError, ScenarioError
from fedsim.scenario import AttackSpec, Knowledge, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, ModelFacts, Reconstruction


class BatchNormPrior:
    """``R_BN`` via forward hooks on every BatchNorm layer's input, against a snapshot of its running stats.

    After a forward pass, :meth:`collect` returns the summed penalty of that pass and resets it.
    """

    def __init__(self, model: nn.Module, first_weight: float = 10.0) -> None:
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.running_mean is not None and m.running_var is not None]
        self.targets = [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in layers]
        self.weights = [first_weight if i == 0 else 1.0 for i in range(len(layers))]
        self.terms: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            h = inputs[0]
            dims = [0, *range(2, h.dim())]
            mean, var = h.mean(dims), h.var(dims, unbiased=False)
            mu, sigma2 = self.targets[index]
            self.terms.append(self.weights[index] * ((mean - mu).norm() + (var - sigma2).norm()))

        return hook

    def __len__(self) -> int:
        return len(self.targets)

    def collect(self) -> Tensor | None:
        total = sum(self.terms) if self.terms else None
        self.terms = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def warmup_cosine(step: int, iterations: int, warmup: int) -> float:
    """Learning-rate factor at 0-based ``step``: linear warm-up over ``warmup`` steps times a cosine decay."""
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / max(iterations, 1)))


@dataclass(frozen=True)
class GroupRun:
    """Final group ``x`` (K, B, C, H, W), steps run, seeds that turned non-finite, and why it stopped early."""

    x: Tensor
    iterations: int
    dead: Tensor
    stopped: Literal["time limit", "non-finite loss"] | None = None


def optimize_group(
    seed_losses: Callable[[Tensor, Tensor | None], Tensor],
    x0: Tensor,
    *,
    iterations: int,
    lr: float,
    warmup: int,
    box: tuple[Tensor, Tensor] | None,
    langevin: float,
    group_start: int,
    group_every: int,
    generator: torch.Generator,
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> GroupRun:
    """Adam on a group ``x0`` of K seeds; ``seed_losses(x, anchor)`` returns the K per-seed objectives.

    ``anchor`` is the detached group mean, first built at step ``group_start`` and refreshed every
    ``group_every`` steps (``None`` before). A seed whose loss turns NaN/inf is frozen and left out;
    the run stops when none is left.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    alive = torch.ones(len(x0), dtype=torch.bool)
    anchor: Tensor | None = None
    for step in range(iterations):
        if deadline is not None and time.perf_counter() > deadline:
            return GroupRun(x.detach(), step, ~alive, "time limit")
        if step >= group_start and (step - group_start) % group_every == 0:
            anchor = x.detach()[alive.to(x.device)].mean(dim=0)
        losses = seed_losses(x, anchor)
        alive &= torch.isfinite(losses.detach()).cpu()
        if not bool(alive.any()):
            return GroupRun(x.detach(), step, ~alive, "non-finite loss")
        (grad,) = torch.autograd.grad(losses[alive.to(losses.device)].sum(), [x])
        factor = warmup_cosine(step, iterations, warmup)
        if langevin > 0:
            grad = grad + langevin * lr * factor * torch.randn(x.shape, generator=generator).to(x.device)
        live = alive.view(-1, *[1] * (x.dim() - 1)).to(x.device)
        x.grad = torch.where(live, grad, torch.zeros_like(grad))  # a frozen seed's gradient may be NaN
        opt.param_groups[0]["lr"] = lr * factor
        opt.step()
        if box is not None:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
        if on_step is not None:
            on_step(step + 1)
    return GroupRun(x.detach(), iterations, ~alive)


@register_attack("gradinversion")
class GradInversion(Attack):
    """Gradient matching with BatchNorm-statistics and group-consistency priors (Yin et al., 2021)."""

    summary = "GradInversion (Yin et al. 2021): gradient matching + BN-statistics and group-consistency priors"
    matches_differences = True  # dummy messages via gradient_distance (fedsim.attacks.differences)
    threat_model = "E"  # the SoK's letter for Yin et al. 2021: the BN statistics are the client data's distribution
    assumes = ("the global model's BatchNorm running statistics as the data's distribution (bn_stats: running; "
               "without them: B)",)

    @classmethod
    def threat_model_for(cls, params: AttackParams, knowledge: Knowledge) -> str:
        """E (the SoK's letter) when it uses the BatchNorm statistics prior (``knowledge.bn_stats: running`` and
        ``params.bn > 0``); without it only the gradient, TV and group priors remain: B, or C when an L2/L1
        distance rescales a FedAvg delta by the granted local hyperparameters."""
        if knowledge.bn_stats == "running" and params.bn > 0:
            return cls.threat_model
        return delta_scale_letter("B", params.distance, knowledge)

    class Params(AttackParams):
        lr: float = Field(0.1, gt=0, description="Adam step size (unsigned) after warm-up")
        distance: Literal["l2", "cosine", "l1"] = Field("cosine", description="gradient distance D")
        alpha_grad: float = Field(1.0, gt=0, description="weight a_G of the gradient distance")
        tv: float = Field(1e-2, ge=0, description="a_TV, mean-form total variation")
        l2: float = Field(1e-6, ge=0, description="a_l2, mean image L2 norm")
        bn: float = Field(1e-2, ge=0, description="a_BN, BatchNorm statistics prior (if bn_stats: running)")
        bn_first: float = Field(10.0, ge=0, description="extra weight of the first BN layer (GIFD)")
        group: float = Field(1e-2, ge=0, description="a_grp, pull towards the mean of the K seeds")
        group_start: float = Field(0.25, ge=0, le=1, description="fraction of iterations before R_grp starts")
        group_every: float = Field(0.05, gt=0, le=1, description="refresh the group mean every this fraction")
        warmup: int = Field(50, ge=0, description="warm-up steps (capped at a tenth of the iterations)")
        langevin: float = Field(0.0, ge=0, description="Langevin noise scale (paper 0.2, breaching 0.01)")
        boxed: bool = True
        init: Literal["randn", "rand", "zeros"] = "randn"
        label_strategy: LabelStrategy = Field("auto", description="label inference; 'yin' is the paper's")

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        """Besides the base checks (``bn_stats: client`` is refused there): the BN prior needs running
        statistics that hold data, i.e. FedAvg (FedSGD never aggregates buffers: they stay at their
        initial 0/1) and no attacked round 1 (the model sent out in round 1 has aggregated nothing)."""
        super().check_scenario(scenario, spec)
        p = cls.Params.model_validate(spec.params)
        if spec.knowledge.bn_stats == "running" and p.bn > 0:
            if scenario.federation.protocol == "fedsgd":
                raise ScenarioError("knowledge.bn_stats", "'running' gives the BatchNorm prior nothing under "
                                    "fedsgd: the server never aggregates buffers, so the running statistics stay "
                                    "at their initial 0/1; use protocol fedavg, or bn_stats: none")
            if 1 in spec.target_rounds(scenario.federation.rounds):
                raise ScenarioError("knowledge.bn_stats", "'running' gives the BatchNorm prior nothing in round 1: "
                                    "the global model sent out then holds its initial 0/1 statistics; attack "
                                    "later rounds, or set bn_stats: none")
        check_delta_scale(scenario, spec, p.distance)

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """The base label check, and ``bn_stats: running`` only on a model that has BatchNorm layers as
        built (DP-SGD, for one, replaces them by GroupNorm)."""
        super().check_model(scenario, spec, facts)
        p = cls.Params.model_validate(spec.params)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in facts.model.modules())
        if spec.knowledge.bn_stats == "running" and p.bn > 0 and not has_bn:
            raise ScenarioError("knowledge.bn_stats", "'running' asks for the BatchNorm statistics prior, but the "
                                "model as built has no BatchNorm layer (model.norm, or a defense such as dp_sgd "
                                "replacing it); set bn_stats: none")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        p, budget = self.params, self.budget
        num, k, its = examples_to_reconstruct(update), budget.restarts, budget.iterations
        distance = OBJECTIVES[p.distance]
        try:
            model = victim_model(update, self.device)
            target = matching_target(update, model, rescale=p.distance != "cosine")
            labels = labels_for(update, num, known=self.knowledge.labels == "known",
                                strategy=p.label_strategy, model=model).to(self.device)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        prior = BatchNormPrior(model, p.bn_first) if self.knowledge.bn_stats == "running" and p.bn > 0 else None

        def seed_losses(x: Tensor, anchor: Tensor | None) -> Tensor:
            out = []
            for xk in x:
                loss = p.alpha_grad * gradient_distance(model, xk, labels, target, distance)
                bn = prior.collect() if prior is not None else None
                loss = loss + p.tv * total_variation(xk) + p.l2 * image_norm(xk)
                if bn is not None:
                    loss = loss + p.bn * bn
                if anchor is not None:
                    loss = loss + p.group * image_norm(xk - anchor)
                out.append(loss)
            return torch.stack(out)

        gen = torch_generator(self.seed, "gradinversion")
        x0 = torch.stack([initial_inputs(p.init, (num, *update.task.input_shape), gen) for _ in range(k)])
        box = pixel_box(update.task.mean, update.task.std, self.device) if p.boxed else None
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        scaled = None if progress is None else (lambda done, total: progress(done * k, total * k))
        try:
            run = optimize_group(
                seed_losses, x0.to(self.device), iterations=its, lr=p.lr, warmup=min(p.warmup, its // 10),
                box=None if box is None else (box[0].unsqueeze(0), box[1].unsqueeze(0)), langevin=p.langevin,
                group_start=round(p.group_start * its), group_every=max(1, round(p.group_every * its)),
                generator=gen, deadline=deadline, on_step=ticker(scaled, its, its, 0),
            )
            if prior is not None:
                prior.remove()
            scores = [math.inf if bool(dead) else
                      gradient_distance(model, xk, labels, target, distance, create_graph=False).item()
                      for xk, dead in zip(run.x, run.dead, strict=True)]
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        best = min(range(k), key=lambda i: scores[i])
        if not math.isfinite(scores[best]) or (run.iterations == 0 and run.stopped == "time limit"):
            why = "the loss became NaN/inf" if run.stopped != "time limit" else "the time limit hit before any step"
            return Reconstruction.failure(f"no usable seed: {why}", seconds=seconds, restarts=float(k))
        stats = {
            "grad_loss": scores[best], "iterations": float(run.iterations), "restarts": float(k),
            "best_restart": float(best), "failed_restarts": float(run.dead.sum()),
            "bn_layers": float(len(prior) if prior is not None else 0),
            "time_limited": float(run.stopped == "time limit"), "seconds": seconds,
        }
        images = to_pixels(run.x[best], update.task.mean, update.task.std)
        return Reconstruction(images=images, labels=labels.cpu(), stats=stats)
