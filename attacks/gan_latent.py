"""GAN latent search: gradient inversion inside a generator's range (GGL, Li et al., CVPR 2022;
GIAS's latent phase, Jeon et al., NeurIPS 2021).

Instead of optimising pixels (Inverting Gradients), the attacker optimises a latent ``z`` of a
generator ``G`` trained on public data of the task's domain, so every candidate is a plausible image:

    min_z  D(grad_theta CE(f_theta(T(G(z))), y), g*) + lambda_z R(z) + alpha_TV TV(T(G(z))),

with ``T`` the map to the task's normalised inputs (see :class:`fedsim.attacks.gan_prior.AttackPrior`),
``D`` the cosine (default; Geiping et al.'s scale-free distance) or the L2 distance (GGL), and
``R`` GGL's KL term on the latent's entries (or a norm term). GGL searches with CMA-ES; this plug-in
uses Adam on ``z`` as GIAS does (gradients through a small generator are cheap), with GIFD's
warm-up + cosine learning-rate schedule (``lr_schedule``). Labels are inferred from the update (iDLG for one image,
count-aware for batches) unless the threat model grants them. Restarts draw fresh latents and are
ranked by the final gradient distance alone, never by ground truth; ``schedule`` runs them fully or by
successive halving on that distance (:mod:`fedsim.attacks.schedule`).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from fedsim.attacks.base import ProgressFn, register_attack
from fedsim.attacks.gan_prior import (
    LATENT_PRIORS,
    GanPriorAttack,
    GanPriorParams,
    Run,
    variable_steps,
)
from fedsim.attacks.inverting_gradients import to_pixels
from fedsim.attacks.matching import examples_to_reconstruct
from fedsim.attacks.objectives import OBJECTIVES
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import OnStep, Sequential, Steps, planned_iterations, run_schedule, rungs
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction


@register_attack("gan_latent")
class GanLatent(GanPriorAttack):
    """Adam over a generator's latent to match the client's gradient (GGL/GIAS-style latent search)."""

    summary = "GAN latent search (GGL/GIAS): gradient matching over a generative prior's latent"

    class Params(GanPriorParams):
        distance: Literal["cosine", "l2"] = Field("cosine", description="gradient distance (GGL uses l2)")
        lr: float = Field(0.3, gt=0, description="peak Adam step size on the latent")
        latent_prior: Literal["kl", "norm"] = Field("kl", description="kl: GGL's KL term; norm: latent-norm term")
        latent_weight: float = Field(0.01, ge=0, description="weight of the latent prior")
        lr_schedule: Literal["gifd", "constant"] = Field("gifd", description="gifd: warm-up then cosine decay")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        p, budget = self.params, self.budget
        victim = self.victim(update)
        if isinstance(victim, Reconstruction):
            return victim
        distance, latent_prior, prior = OBJECTIVES[p.distance], LATENT_PRIORS[p.latent_prior], victim.prior
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        num = examples_to_reconstruct(update)

        def loss_fn(z: torch.Tensor) -> torch.Tensor:
            x = prior.render(z)
            loss = victim.grad_loss(x, distance)
            if p.latent_weight > 0:
                loss = loss + p.latent_weight * latent_prior(z)
            return loss + p.tv * total_variation(x) if p.tv > 0 else loss

        book: RestartBook[Run] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[Run]:
            z0 = prior.generator.sample_latent(num, torch_generator(self.seed, "gan_latent", restart))
            return variable_steps(loss_fn, z0.to(self.device), steps=budget.iterations, lr=p.lr,
                                  schedule=p.lr_schedule, deadline=deadline, on_step=on_step)

        def score(_restart: int, run: Run) -> float:  # ranked by the gradient distance alone
            return victim.grad_loss(prior.render(run.value), distance, create_graph=False).item()

        cohort = Sequential(start_restart, score, lambda run: run.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(p.schedule, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, budget.iterations, book)
            x = None if book.best is None else prior.render(book.best.value).detach()
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None or x is None:
            return book.failure(seconds)
        stats = {**book.stats(), **schedule, "iterations": float(book.best.steps), "seconds": seconds}
        if victim.transform is not None:
            stats["defenses_modeled"] = float(len(victim.transform.defenses))
        return Reconstruction(images=to_pixels(x, update.task.mean, update.task.std),
                              labels=victim.labels.cpu(), stats=stats)
