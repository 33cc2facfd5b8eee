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
returned batch is the seed with the smallest gradient distance (never ground truth). ``schedule: {kind:
halving}`` (:mod:`fedsim.attacks.schedule`) prunes the group by that distance at each rung (the group mean is
then over the survivors); ``full`` keeps all K to the end. Labels are granted or inferred from the update
(Yin: the B smallest per-row minima, ``label_strategy: yin``; the default ``auto`` also handles repeated
labels). ``budget.iterations`` are group steps; each step costs K forward/double-backward passes, as K
sequential restarts would, and progress is reported in those passes (``iterations * restarts`` in all).

The defaults follow breaching/GIFD where they transfer (lr 0.1, first BN layer x10, a_grp 0.01,
a_l2 1e-6) and were measured for the rest on small CIFAR nets: the cosine distance (scale free; the
paper's L2 needs its weight tuned to the gradient's magnitude), a_TV = a_BN = 0.01. Budgets under
~1k iterations do better with lr 0.3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
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
    unusable,
)
from fedsim.attacks.objectives import OBJECTIVES
from fedsim.attacks.regularizers import image_norm, total_variation
from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import (
    PROGRESS_EVERY,
    SCHEDULE_HELP,
    ScheduleSpec,
    keep_rows,
    planned_iterations,
    run_schedule,
    rungs,
)
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


class Group:
    """A group of K seeds under one Adam (:func:`optimize_group`), advanced rung by rung: a
    :class:`fedsim.attacks.schedule.Cohort` whose members are the seeds.

    ``advance(members, until)`` with fewer members than are alive keeps only their rows (inputs and Adam's
    moments, which are elementwise); the group mean is then taken over the survivors at its next refresh. The
    learning-rate factor is a function of the step in ``iterations``. ``score(x_k)`` is a seed's matching loss;
    ``on_step(step, spent)`` runs after every step (``spent``: seed-steps so far).
    """

    def __init__(
        self,
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
        on_step: Callable[[int, int], None] | None = None,
        score: Callable[[Tensor], float] | None = None,
    ) -> None:
        self.seed_losses, self.iterations, self.lr, self.warmup, self.box = seed_losses, iterations, lr, warmup, box
        self.langevin, self.group_start, self.group_every = langevin, group_start, group_every
        self.generator, self.deadline, self.on_step, self.score_of = generator, deadline, on_step, score
        self.x = x0.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr)
        self.rows = list(range(len(x0)))
        self.alive = torch.ones(len(x0), dtype=torch.bool)
        self.anchor: Tensor | None = None
        self.step, self._spent, self.stopped = 0, 0, None
        self.final: dict[int, tuple[Tensor, bool]] = {}

    def _keep(self, members: Sequence[int]) -> None:
        index = [self.rows.index(m) for m in members]
        for row, m in enumerate(self.rows):
            if m not in members:
                self.final[m] = (self.x.detach()[row].clone(), not bool(self.alive[row]))
        self.alive = self.alive[torch.tensor(index)]
        self.x, self.rows = keep_rows(self.opt, self.x, index), list(members)

    def advance(self, members: Sequence[int], until: int) -> bool:
        """Run the seeds ``members`` (ascending) to step ``until``; False past the deadline."""
        if list(members) != self.rows:
            self._keep(members)
        x, alive = self.x, self.alive
        while self.stopped is None and self.step < min(until, self.iterations):
            step = self.step
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.stopped = "time limit"
                return False
            if step >= self.group_start and (step - self.group_start) % self.group_every == 0:
                self.anchor = x.detach()[alive.to(x.device)].mean(dim=0)
            losses = self.seed_losses(x, self.anchor)
            alive &= torch.isfinite(losses.detach()).cpu()
            if not bool(alive.any()):
                self.stopped = "non-finite loss"
                break
            (grad,) = torch.autograd.grad(losses[alive.to(losses.device)].sum(), [x])
            factor = warmup_cosine(step, self.iterations, self.warmup)
            if self.langevin > 0:
                grad = grad + self.langevin * self.lr * factor * torch.randn(x.shape, generator=self.generator).to(
                    x.device)
            live = alive.view(-1, *[1] * (x.dim() - 1)).to(x.device)
            x.grad = torch.where(live, grad, torch.zeros_like(grad))  # a frozen seed's gradient may be NaN
            self.opt.param_groups[0]["lr"] = self.lr * factor
            self.opt.step()
            if self.box is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, self.box[1]), self.box[0]))
            self.step += 1
            self._spent += len(self.rows)
            if self.on_step is not None:
                self.on_step(self.step, self._spent)
        return True

    def started(self, i: int) -> bool:
        return True

    def result(self, i: int) -> tuple[Tensor, str | None]:
        x, dead = self.seed(i)
        return x, "non-finite loss" if dead else self.stopped if self.stopped == "time limit" else None

    def seed(self, i: int) -> tuple[Tensor, bool]:
        """Seed ``i``'s inputs (B, C, H, W) and whether it turned non-finite."""
        if i in self.final:
            return self.final[i]
        row = self.rows.index(i)
        return self.x.detach()[row], not bool(self.alive[row])

    def score(self, i: int) -> float:
        x, dead = self.seed(i)
        if dead or self.score_of is None:
            return math.inf
        return self.score_of(x)

    def drop(self, members: Sequence[int]) -> None:
        """Nothing to do until the next :meth:`advance` keeps the survivors' rows."""

    def spent(self) -> int:
        return self._spent


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
    the run stops when none is left. (All K seeds to the end: the ``full`` schedule of :class:`Group`.)
    """
    group = Group(seed_losses, x0, iterations=iterations, lr=lr, warmup=warmup, box=box, langevin=langevin,
                  group_start=group_start, group_every=group_every, generator=generator, deadline=deadline,
                  on_step=None if on_step is None else (lambda i, _spent: on_step(i)))
    group.advance(list(range(len(x0))), iterations)
    return GroupRun(group.x.detach(), group.step, ~group.alive, group.stopped)


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
        schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

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
        planned = planned_iterations(rungs(p.schedule, k, its))

        def on_step(i: int, spent: int) -> None:
            if progress is not None and (i % PROGRESS_EVERY == 0 or i == its):
                progress(spent, planned)

        def score(xk: Tensor) -> float:  # the seeds are ranked by the gradient distance alone
            value = gradient_distance(model, xk, labels, target, distance, create_graph=False).item()
            if prior is not None:
                prior.collect()  # this forward's BN terms must not reach the next step's loss
            return value

        group = Group(seed_losses, x0.to(self.device), iterations=its, lr=p.lr, warmup=min(p.warmup, its // 10),
                      box=None if box is None else (box[0].unsqueeze(0), box[1].unsqueeze(0)), langevin=p.langevin,
                      group_start=round(p.group_start * its), group_every=max(1, round(p.group_every * its)),
                      generator=gen, deadline=deadline, on_step=on_step, score=score)
        book: RestartBook[Tensor] = RestartBook()
        try:
            schedule = run_schedule(p.schedule, group, k, its, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        finally:
            if prior is not None:
                prior.remove()
        seconds = time.perf_counter() - start
        if book.best is None or (group.step == 0 and group.stopped == "time limit"):
            why = "the loss became NaN/inf" if group.stopped != "time limit" else "the time limit hit before any step"
            return Reconstruction.failure(f"no usable seed: {why}", seconds=seconds, restarts=float(k))
        stats = {
            **book.stats(), **schedule, "iterations": float(group.step),
            "bn_layers": float(len(prior) if prior is not None else 0), "seconds": seconds,
        }
        images = to_pixels(book.best, update.task.mean, update.task.std)
        return Reconstruction(images=images, labels=labels.cpu(), stats=stats)
