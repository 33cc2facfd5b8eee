"""Pieces shared by the GAN-prior attacks (:mod:`fedsim.attacks.gan_latent`, :mod:`fedsim.attacks.gifd`).

A generative prior replaces the pixel-space search of Inverting Gradients by a search over a
generator's latent (GGL, Li et al., CVPR 2022; GIAS, Jeon et al., NeurIPS 2021) or its intermediate
features (GIFD, Fang et al., ICCV 2023). This module holds what they share:

* :func:`load_attack_prior`: resolve the prior (a shipped name such as ``mnist-dcgan`` or a file
  written by ``fedsim prior train``), check it fits the task, and map the generator's output to the
  task's normalised inputs (GIFD: ``[-1, 1] -> [0, 1] -> resize -> (x - mu) / sigma``);
* the projections GIFD applies after every step: :func:`spherical_projection` (latent kept on its
  initial sphere) and :func:`project_l1_ball` (Duchi et al., ICML 2008, sort-based, exact);
* the GIFD learning-rate schedule :func:`gifd_lr` and the latent priors (GGL's KL term, a norm term);
* :func:`optimize_variable`, one Adam run over a latent or feature with a per-step schedule and
  projection, which stops early (keeping the iterate) at a deadline or a non-finite loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams
from fedsim.attacks.defense_aware import DefenseTransform, defense_transform
from fedsim.attacks.inverting_gradients import gradient_distance, pixel_box
from fedsim.attacks.matching import (
    LabelStrategy,
    check_delta_scale,
    examples_to_reconstruct,
    labels_for,
    matching_target,
    unusable,
)
from fedsim.attacks.objectives import Distance
from fedsim.attacks.schedule import SCHEDULE_HELP, ScheduleSpec, Steps, run_to_end
from fedsim.attacks.victim import victim_model
from fedsim.errors import DataUnavailableError, FedsimError
from fedsim.priors import DCGANGenerator, PriorMeta, load_prior, resolve_prior_path
from fedsim.scenario import AttackSpec, Budget, Knowledge, Scenario
from fedsim.threat import ClientUpdate, Reconstruction, TaskInfo

DEFAULT_PRIOR = "mnist-dcgan"


class PriorMismatchError(FedsimError, ValueError):
    """The generative prior cannot produce the task's inputs (e.g. wrong number of channels)."""


class GanPriorParams(AttackParams):
    """Parameters every GAN-prior attack has."""

    prior: str = Field(DEFAULT_PRIOR, description="shipped prior name or path of a `fedsim prior train` file")
    tv: float = Field(1e-4, ge=0, description="weight of the mean-form total variation of the generated image")
    label_strategy: LabelStrategy = Field("auto", description="label inference when labels are not known")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

    @field_validator("schedule", mode="before")
    @classmethod
    def _restart_schedule(cls, value: object) -> object:
        """``schedule`` is the restart schedule; gan_latent's learning-rate schedule is ``lr_schedule``."""
        if value in ("gifd", "constant"):
            raise ValueError(f"schedule is the restart schedule ({{kind: full|halving}}); the learning-rate schedule "
                             f"{value!r} is params.lr_schedule")
        return value


@dataclass(frozen=True)
class AttackPrior:
    """A frozen generator and the map from its output to the task's normalised input space."""

    generator: DCGANGenerator
    meta: PriorMeta
    mean: Tensor  # (1, C, 1, 1)
    std: Tensor  # (1, C, 1, 1)
    size: tuple[int, int]  # the task's (H, W)

    def to_input(self, out: Tensor) -> Tensor:
        """Generator output in [-1, 1] -> pixels [0, 1] -> task resolution -> ``(x - mu) / sigma``.

        Resizing uses area interpolation when shrinking (GIFD's BigGAN path) and bilinear when growing.
        """
        pixels = (out + 1) / 2
        if tuple(pixels.shape[-2:]) != self.size:
            shrink = pixels.shape[-2] >= self.size[0] and pixels.shape[-1] >= self.size[1]
            pixels = (F.interpolate(pixels, size=self.size, mode="area") if shrink else
                      F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False))
        return (pixels - self.mean) / self.std

    def render(self, h: Tensor, start: int = 0) -> Tensor:
        """The task input generated from block ``start``'s input ``h`` (the latent when ``start`` is 0)."""
        return self.to_input(self.generator.forward_blocks(h, start))


def check_prior_name(name: str) -> None:
    """Raise :class:`~fedsim.errors.DataUnavailableError` (naming the field and the shipped priors) if
    ``name`` does not resolve to a prior file; used at scenario validation, before anything runs."""
    try:
        resolve_prior_path(name)
    except DataUnavailableError as err:
        raise DataUnavailableError(f"params.prior: {err}") from None


def check_prior_disjoint(scenario: Scenario, name: str) -> None:
    """Refuse a prior that learned from images the scenario's clients hold: its attack would be handed
    the private data through the prior (an unlabelled oracle). Compared by data source, not dataset name
    (:func:`fedsim.priors.disjoint.check_prior_disjoint`): ``mnist`` clients hold ``mnist-5k``'s images."""
    from fedsim.priors.disjoint import check_prior_disjoint as check

    check(scenario.data, name)


class GanPriorAttack(Attack):
    """Base of the gradient-matching attacks with a GAN prior: validation checks the prior resolves and
    that an L2 distance on a FedAvg delta has the local hyperparameters it needs to rescale."""

    models_defenses = True  # knowledge.defense: apply the listed defenses' deterministic parts (GIFD)
    matches_differences = True  # dummy messages via Victim.grad_loss -> gradient_distance (fedsim.attacks.differences)
    #: The SoK's letter for the GAN-prior attacks (Jeon et al. 2021 GIAS, Li et al. 2022 GGL, Fang et al. 2023
    #: GIFD): the generator was trained on surrogate data, so the scenario must grant knowledge.auxiliary_data
    #: (and, D being cumulative, the training details of C: knowledge.local_hparams).
    threat_model = "D"
    assumes = ("a generative prior trained on surrogate data disjoint from the clients' (knowledge.auxiliary_data)",)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        super().check_scenario(scenario, spec)
        params = cls.Params.model_validate(spec.params)
        check_delta_scale(scenario, spec, params.distance)
        check_prior_name(params.prior)
        check_prior_disjoint(scenario, params.prior)

    def victim(self, update: ClientUpdate) -> Victim | Reconstruction:
        """:func:`prepare_victim` for this attack's params and threat model, or the failed result saying why."""
        p = self.params
        victim = prepare_victim(p, self.knowledge, self.budget, update, self.device, rescale=p.distance != "cosine")
        return Reconstruction.failure(victim) if isinstance(victim, str) else victim


def load_attack_prior(params: GanPriorParams, task: TaskInfo, device: torch.device | str) -> AttackPrior:
    """Load ``params.prior`` on ``device`` and check it can produce inputs of ``task``.

    Raises :class:`~fedsim.errors.DataUnavailableError` for a missing or unreadable prior and
    :class:`PriorMismatchError` when the channels differ from the task's (a grey prior cannot draw
    colour images) or the task is not an image task.
    """
    prior = load_prior(params.prior, device)
    shape = tuple(task.input_shape)
    if len(shape) != 3:
        raise PriorMismatchError(f"prior {params.prior!r} draws images, but the task's inputs have shape {shape}")
    if prior.meta.channels != shape[0]:
        raise PriorMismatchError(
            f"prior {params.prior!r} draws {prior.meta.channels}-channel images, the task "
            f"({task.dataset}) has {shape[0]} channels")
    mean = torch.tensor(task.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(task.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return AttackPrior(prior.generator, prior.meta, mean, std, (int(shape[1]), int(shape[2])))


def defense_for(knowledge: Knowledge, update: ClientUpdate, model: nn.Module) -> DefenseTransform | None:
    """GIFD's defense-aware matching (see :mod:`fedsim.attacks.defense_aware`): the deterministic part of the
    listed defenses, applied to the dummy gradient; ``None`` unless ``knowledge.defense`` is granted."""
    if not knowledge.defense or not update.defenses:
        return None
    return defense_transform(update.defenses, [name for name, _ in model.named_parameters()])


@dataclass(frozen=True)
class Victim:
    """Everything a GAN-prior attack matches against: the rebuilt model, the target gradient, the
    labels, the defense-aware transform (or ``None``), the prior and the task's pixel box."""

    model: nn.Module
    target: list[Tensor]
    labels: Tensor
    transform: DefenseTransform | None
    prior: AttackPrior
    box: tuple[Tensor, Tensor]

    def grad_loss(self, x: Tensor, distance: Distance, create_graph: bool = True) -> Tensor:
        """``D(T(grad_theta CE(f(x), y)), g*)`` (see :func:`fedsim.attacks.inverting_gradients.gradient_distance`)."""
        return gradient_distance(self.model, x, self.labels, self.target, distance, create_graph, self.transform)


def prepare_victim(params: GanPriorParams, knowledge: Knowledge, budget: Budget, update: ClientUpdate,
                   device: torch.device, *, rescale: bool) -> Victim | str:
    """Rebuild the victim, target gradient (``rescale``: FedAvg delta as a mean gradient, for L2),
    labels, defense transform and prior for ``update``; or the reason the update cannot be attacked
    (broken update, empty budget, mismatched model, missing or unfit prior), as a string."""
    reason = unusable(update, budget)
    if reason is not None:
        return reason
    try:
        model = victim_model(update, device)
        target = matching_target(update, model, rescale=rescale)
        labels = labels_for(update, examples_to_reconstruct(update), known=knowledge.labels == "known",
                            strategy=params.label_strategy, model=model).to(device)
        defense = defense_for(knowledge, update, model)
        prior = load_attack_prior(params, update.task, device)
    except (FedsimError, ValueError, RuntimeError) as err:
        return str(err)
    transform = defense if defense is not None and defense.defenses else None
    return Victim(model, target, labels, transform, prior, pixel_box(update.task.mean, update.task.std, device))


def spherical_projection(v: Tensor, norms: Tensor) -> Tensor:
    """Rescale each sample of ``v`` (B, ...) to the L2 norm in ``norms`` (B,) (GIFD's SphericalOptimizer)."""
    current = v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return v * (norms / current).view(-1, *([1] * (v.dim() - 1)))


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each sample of ``v`` (B, ...) onto ``{w : |w|_1 <= radius}``.

    Duchi, Shalev-Shwartz, Singer, Chandra (ICML 2008), Fig. 1: sort ``|v|`` decreasingly, find
    ``rho = max{j : u_j - (sum_{i<=j} u_i - r) / j > 0}``, ``theta = (sum_{i<=rho} u_i - r) / rho``,
    and soft-threshold ``w = sign(v) max(|v| - theta, 0)``. Samples already inside are returned as is.
    """
    if radius < 0 or not math.isfinite(radius):
        raise ValueError(f"L1 radius must be finite and >= 0, got {radius}")
    flat = v.flatten(1)
    if radius == 0:
        return torch.zeros_like(v)
    mag = flat.abs()
    inside = mag.sum(dim=1) <= radius
    u = torch.sort(mag, dim=1, descending=True).values
    css = u.cumsum(dim=1)
    j = torch.arange(1, flat.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - (css - radius) / j) > 0).sum(dim=1).clamp_min(1)  # the condition holds for a prefix
    theta = (css.gather(1, (rho - 1).unsqueeze(1)).squeeze(1) - radius) / rho.to(v.dtype)
    projected = flat.sign() * (mag - theta.unsqueeze(1)).clamp_min(0)
    return torch.where(inside.unsqueeze(1), flat, projected).view_as(v)


def project_l1_around(v: Tensor, v0: Tensor, radius: float) -> Tensor:
    """``v0 + Proj_{|.|_1 <= radius}(v - v0)`` per sample: GIFD's bound on how far a stage moves a feature."""
    return v0 + project_l1_ball(v - v0, radius)


def gifd_lr(base: float, t: float) -> float:
    """GIFD's per-step learning rate at progress ``t = step / steps`` of a stage: a 5 % linear warm-up,
    then a half-cosine decay reaching 0 at the end, ``base * (0.5 - 0.5 cos(pi * min(1, (1-t)/0.75)))
    * min(1, t/0.05)`` (``inversefed/reconstruction_algorithms.py`` of the GIFD repository)."""
    return base * (0.5 - 0.5 * math.cos(math.pi * min(1.0, (1.0 - t) / 0.75))) * min(1.0, t / 0.05)


def latent_kl(z: Tensor) -> Tensor:
    """GGL's latent prior (Li et al., CVPR 2022): the KL divergence of N(m_i, s_i^2), fitted to the
    entries of each latent ``z_i``, from N(0, 1); mean over the batch. Zero for a typical Gaussian draw."""
    flat = z.flatten(1)
    mean, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
    return (-0.5 * (1 + torch.log(var + 1e-10) - mean.pow(2) - var)).mean()


def latent_norm(z: Tensor) -> Tensor:
    """``(|z_i|_2 / sqrt(d) - 1)^2`` averaged over the batch: keeps a latent near the Gaussian shell."""
    flat = z.flatten(1)
    return (flat.norm(dim=1) / math.sqrt(flat.shape[1]) - 1).pow(2).mean()


LATENT_PRIORS: dict[str, Callable[[Tensor], Tensor]] = {"kl": latent_kl, "norm": latent_norm}


@dataclass(frozen=True)
class Run:
    """One optimisation of a variable: its final value, steps taken, and why it stopped early if it did."""

    value: Tensor
    steps: int
    stopped: Literal["time limit", "non-finite loss"] | None = None


def variable_steps(
    loss_fn: Callable[[Tensor], Tensor],
    v0: Tensor,
    *,
    steps: int,
    lr: float,
    schedule: Literal["gifd", "constant"] = "gifd",
    project: Callable[[Tensor], Tensor] | None = None,
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Steps[Run]:
    """:func:`optimize_variable` one step at a time: yields ``(i, Run so far)`` after step ``i`` and returns the
    final :class:`Run` (the restart protocol of :mod:`fedsim.attacks.schedule`)."""
    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    for step in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            return Run(v.detach(), step, "time limit")
        if schedule == "gifd":
            for group in opt.param_groups:
                group["lr"] = gifd_lr(lr, step / steps)
        loss = loss_fn(v)
        if not torch.isfinite(loss):
            return Run(v.detach(), step, "non-finite loss")
        (grad,) = torch.autograd.grad(loss, [v])
        v.grad = grad
        opt.step()
        if project is not None:
            with torch.no_grad():
                v.copy_(project(v))
        if on_step is not None:
            on_step(step + 1)
        yield step + 1, Run(v.detach(), step + 1)
    return Run(v.detach(), steps)


def optimize_variable(
    loss_fn: Callable[[Tensor], Tensor],
    v0: Tensor,
    *,
    steps: int,
    lr: float,
    schedule: Literal["gifd", "constant"] = "gifd",
    project: Callable[[Tensor], Tensor] | None = None,
    deadline: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Run:
    """Minimise ``loss_fn(v)`` over ``v`` with (unsigned) Adam, as GIFD and GIAS do for a latent or feature.

    ``schedule="gifd"`` sets the learning rate to :func:`gifd_lr` before every step; ``project``
    maps the iterate back onto its feasible set after every step (spherical or L1-ball). A
    non-finite loss or passing ``deadline`` (``time.perf_counter()``) stops the run and returns the
    current iterate, with the reason in ``Run.stopped``. ``on_step(i)`` runs after step ``i`` (1-based).
    """
    return run_to_end(variable_steps(loss_fn, v0, steps=steps, lr=lr, schedule=schedule, project=project,
                                     deadline=deadline, on_step=on_step))
