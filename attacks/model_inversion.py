"""Model inversion of the released global model with a GAN prior: ``gmi`` and ``if_gmi``.

Threat model: whoever obtains the global model released after a round (the federation's product)
tries to recover what a class "looks like" in the clients' private data. The attack reads only a
:class:`~fedsim.threat.ReleasedModel` (task facts + weights) and a generative prior trained on
public, disjoint data (the shipped ``mnist-dcgan``: mnist-5k train examples 2000..3999).

* ``gmi`` — Generative Model Inversion (Zhang, Jia, Pei, Wang, Li, Song; CVPR 2020, "The Secret
  Revealer"): ``min_z CE(f(G(z)), c) + lambda * softplus(-D(G(z)))``, the identity loss under the
  target model plus the discriminator's prior loss (GMI's ``-D(G(z))`` is for its WGAN; fedsim's DCGAN
  discriminator is trained with BCE, so "looks real" is ``-log sigmoid D = softplus(-D)``). Adam on z,
  clipped to ``[-latent_clip, latent_clip]`` after each step as GMI clips its latent.
* ``if_gmi`` — IF-GMI (Qiu, Fang, Yu, Chen, Qiu, Xia; ECCV 2024): PPA's initial selection (per class,
  start from the pool latents the target model is most confident about), a latent stage (kept on its
  initial sphere), then, stage by stage, the *input of generator block k* (k = 1 .. len(radii), at
  most 3), each within an L1 ball around that stage's start (GIFD's projection, Fang et al., ICCV
  2023), with the Poincaré loss ``arccosh(1 + 2|u-v|^2 / ((1-|u|^2)(1-|v|^2)))``, u the L1-normalised
  logits and v the one-hot target minus 1e-4 (clipped at 0); ``loss: ce`` swaps in cross-entropy
  (PPA's ``loss_fkt`` choice). Radii are *relative*, ``radii[k-1] * |h_k|_1`` of each sample's stage
  start (IF-GMI's absolute radii, 1000..8000, are for StyleGAN2 features). IF-GMI's per-step
  random-resized-crop augmentation is omitted (28x28 digits, not 224x224 faces). Measured on
  ``scenarios/attacks/model_inversion.yaml``: Poincaré 0.65 evaluation accuracy vs 1.00 for GMI; with
  ``loss: ce`` about 0.95 (the 10-logit Poincaré target is hard to reach for a small ConvNet).

**Selection, without an oracle.** Every target image gets ``budget.restarts`` candidates, optimised
together in one batch; for ``if_gmi`` every stage's image is a candidate too. The returned image is
the candidate with the lowest *target-model* loss (CE for ``gmi``, Poincaré for ``if_gmi``). IF-GMI's
reference driver reports the generator layer with the best *evaluation-classifier* accuracy, an oracle
the attacker does not have; fedsim never shows the evaluation classifier to an attack.

**Stochastic released models.** MID's VIB head samples its bottleneck at prediction time, so one
forward pass is a noisy estimate. The attack tests this (two passes on one input differ) and then
averages the logits of ``forward_passes`` passes (in one batched call) in every loss, and of
``4 x forward_passes`` passes when selecting candidates (expectation over transformation; Athalye et
al., ICML 2018). The model is rebuilt like update attacks rebuild theirs (architecture from
``TaskInfo.model``, then ``TaskInfo.model_transforms``), in eval mode.

Both reuse :mod:`fedsim.attacks.gan_prior` (prior loading and the task-space map, spherical and L1-ball
projections, the Adam runner).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import AttackParams, ModelInversionAttack, ModelInversionParams, ProgressFn, register_attack
from fedsim.attacks.gan_prior import (
    DEFAULT_PRIOR,
    AttackPrior,
    check_prior_disjoint,
    check_prior_name,
    load_attack_prior,
    optimize_variable,
    project_l1_ball,
    spherical_projection,
)
from fedsim.attacks.matching import ticker
from fedsim.attacks.victim import rebuild_model
from fedsim.errors import FedsimError
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import Reconstruction, ReleasedModel

POINCARE_XI = 1e-4


class _MIParams(ModelInversionParams):
    prior: str = Field(DEFAULT_PRIOR, description="shipped prior name or path of a `fedsim prior train` file")
    lr: float = Field(0.05, gt=0, description="Adam step size on the latent")
    forward_passes: int = Field(4, ge=1, le=64, description="logit averaging for a stochastic released model")


def released_network(model: ReleasedModel, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the released model (architecture + the model-shaping defenses' transforms), load its
    state, eval mode, gradients off. Raises :class:`UpdateMismatchError` when the state does not fit."""
    net = rebuild_model(model.task, model.state, "the released state")
    return net.to(device).eval().requires_grad_(False)


def is_stochastic(net: nn.Module, input_shape: tuple[int, ...], device: torch.device | str) -> bool:
    """Whether two eval-mode forward passes on the same input differ (e.g. MID's sampled bottleneck)."""
    x = torch.zeros(2, *input_shape, device=device)
    with torch.no_grad():
        return not torch.equal(net(x), net(x))


def averaged_logits(net: nn.Module, x: Tensor, passes: int) -> Tensor:
    """The mean logits of ``passes`` forward passes, computed as one batch."""
    if passes == 1:
        return net(x)
    return net(x.repeat(passes, *([1] * (x.dim() - 1)))).view(passes, len(x), -1).mean(0)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def poincare_loss(logits: Tensor, labels: Tensor, xi: float = POINCARE_XI) -> Tensor:
    """Per-sample Poincaré distance between L1-normalised logits and the one-hot target minus ``xi``
    (PPA/IF-GMI ``losses/poincare.py``)."""
    u = logits / logits.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    v = (F.one_hot(labels, logits.shape[1]).to(logits.dtype) - xi).clamp_min(0)
    delta = 2 * (u - v).pow(2).sum(1) / ((1 - u.pow(2).sum(1)).clamp_min(1e-12) * (1 - v.pow(2).sum(1)))
    return torch.arccosh(1 + delta)


class _Inversion:
    """One inversion: the released network, the prior, the target labels of all candidates, and the losses."""

    def __init__(self, attack: _ModelInversionBase, model: ReleasedModel, classes: list[int]) -> None:
        p = attack.params
        self.device = attack.device
        self.net = released_network(model, self.device)
        self.prior: AttackPrior = load_attack_prior(p, model.task, self.device)  # type: ignore[arg-type]
        self.stochastic = is_stochastic(self.net, tuple(model.task.input_shape), self.device)
        self.passes = p.forward_passes if self.stochastic else 1
        per_class = p.samples_per_class
        self.targets = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
        self.restarts = attack.budget.restarts
        self.labels = self.targets.repeat(self.restarts).to(self.device)  # candidates: restart-major
        self.mean, self.std = self.prior.mean, self.prior.std

    def logits(self, x: Tensor, passes: int | None = None) -> Tensor:
        return averaged_logits(self.net, x, passes or self.passes)

    def pixels(self, x: Tensor) -> Tensor:
        return (x.detach() * self.std + self.mean).clamp(0, 1).cpu()

    @torch.no_grad()
    def selection_loss(self, x: Tensor, loss: Callable[[Tensor, Tensor], Tensor], seed: int) -> Tensor:
        """Per-candidate target loss for choosing, with 4x the passes under a fixed seed (same draws for all)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return loss(self.logits(x, 4 * self.passes), self.labels).cpu()

    def pick(self, images: list[Tensor], losses: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per target image, the (stage, restart) candidate with the lowest target loss:
        (images, their losses, the chosen stage index)."""
        n = len(self.targets)
        loss = torch.stack(losses).view(len(losses), self.restarts, n)  # (stage, restart, target)
        loss = loss.nan_to_num(nan=float("inf"))
        flat = loss.permute(2, 0, 1).reshape(n, -1)
        best = flat.argmin(dim=1)
        stage, restart = best // self.restarts, best % self.restarts
        stack = torch.stack(images).view(len(images), self.restarts, n, *images[0].shape[1:])
        idx = torch.arange(n)
        return stack[stage, restart, idx], flat[idx, best], stage


class _ModelInversionBase(ModelInversionAttack):
    """Shared driver: checks, the released network and prior, the candidate search (``_search``) and the
    per-image choice by target loss."""

    Params: ClassVar[type[AttackParams]] = _MIParams
    #: SoK letter D (Data-Enhanced Eavesdropper). Model inversion is outside the SoK's tables (it attacks the
    #: released model, not an update), but its attacker is the SoK's passive one holding surrogate data: it reads
    #: what every participant receives (the global model: basic knowledge) and nothing it would have to manipulate,
    #: and its whole power comes from a GAN prior trained on auxiliary images (GMI's and IF-GMI's public data), the
    #: capability that separates D from C. D is cumulative, so scenarios grant knowledge.local_hparams too, though
    #: these attacks never read a client's training details.
    threat_model = "D"
    assumes = ("the released global model only (no client update)",
               "a GAN prior trained on surrogate data disjoint from the clients' (knowledge.auxiliary_data)")

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        super().check_scenario(scenario, spec)
        prior = cls.Params.model_validate(spec.params).prior
        check_prior_name(prior)
        check_prior_disjoint(scenario, prior)

    def invert(self, model: ReleasedModel, target_classes: list[int],
               progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        top = model.task.num_classes - 1
        bad = [c for c in target_classes if not 0 <= c <= top]
        if bad or not target_classes:
            return Reconstruction.failure(f"params.target_classes: {bad or 'none'} outside 0..{top}")
        if self.budget.iterations == 0:
            return Reconstruction.failure("budget.iterations is 0: nothing to optimize")
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in model.state.values()):
            return Reconstruction.failure("the released model has NaN or infinite weights (training diverged)")
        try:
            inv = _Inversion(self, model, target_classes)
            deadline = None if self.budget.time_limit_s is None else start + self.budget.time_limit_s
            images, losses, stats = self._search(inv, deadline, progress)
        except (FedsimError, ValueError, RuntimeError, IndexError) as err:
            return Reconstruction.failure(f"{type(err).__name__}: {err}")
        if stats.pop("diverged", 0.0):
            return Reconstruction.failure("the target loss became NaN/inf", seconds=time.perf_counter() - start)
        chosen, loss, stage = inv.pick(images, losses)
        stats.update(target_loss=float(loss.mean()), stochastic_model=float(inv.stochastic),
                     forward_passes=float(inv.passes), candidates=float(inv.restarts * len(images)),
                     seconds=time.perf_counter() - start)
        if len(images) > 1:
            stats["stage_mean"] = float(stage.float().mean())
        return Reconstruction(images=chosen, labels=inv.targets.clone(), stats=stats)

    def _search(self, inv: _Inversion, deadline: float | None,
                progress: ProgressFn | None) -> tuple[list[Tensor], list[Tensor], dict[str, float]]:
        """Candidate images (pixels) per stage and their per-candidate selection losses."""
        raise NotImplementedError

    def _latent0(self, inv: _Inversion) -> Tensor:
        n = len(inv.labels)
        return inv.prior.generator.sample_latent(n, torch_generator(self.seed, "mi-latent")).to(self.device)


@register_attack("gmi")
class GMI(_ModelInversionBase):
    """GMI (Zhang et al., CVPR 2020): latent search, target CE + discriminator prior, by target loss."""

    summary = "GMI (Zhang et al. 2020): GAN-prior model inversion of the released model, CE + D prior"

    class Params(_MIParams):
        prior_weight: float = Field(0.1, ge=0, description="weight of the discriminator's prior loss")
        latent_clip: float = Field(2.0, gt=0, description="z is clipped to [-latent_clip, latent_clip]")

    def _search(self, inv: _Inversion, deadline: float | None,
                progress: ProgressFn | None) -> tuple[list[Tensor], list[Tensor], dict[str, float]]:
        p, steps = self.params, self.budget.iterations
        gen, disc = inv.prior.generator, load_discriminator(p.prior, self.device)

        def loss_fn(z: Tensor) -> Tensor:
            out = gen(z)
            loss = F.cross_entropy(inv.logits(inv.prior.to_input(out)), inv.labels, reduction="sum")
            if p.prior_weight > 0:
                loss = loss + p.prior_weight * F.softplus(-disc(out)).sum()
            return loss

        run = optimize_variable(loss_fn, self._latent0(inv), steps=steps, lr=p.lr, schedule="constant",
                                project=lambda z: z.clamp(-p.latent_clip, p.latent_clip), deadline=deadline,
                                on_step=ticker(progress, steps, steps, 0))
        with torch.no_grad():
            x = inv.prior.render(run.value)
        ce = inv.selection_loss(x, _cross_entropy, self.seed)
        return [inv.pixels(x)], [ce], {"iterations": float(run.steps), **_stopped(run.stopped)}


def _stopped(why: str | None) -> dict[str, float]:
    """Stats for why an optimisation stopped early (``diverged`` makes :meth:`invert` fail)."""
    return {"time_limited": float(why == "time limit"), "diverged": float(why == "non-finite loss")}


def load_discriminator(prior: str, device: torch.device | str) -> nn.Module:
    """The prior's discriminator (eval mode, frozen), for GMI's prior loss."""
    from fedsim.priors import load_prior

    return load_prior(prior, device).discriminator


def project_l1_relative(v: Tensor, v0: Tensor, fraction: float, scale: Tensor) -> Tensor:
    """``v0 + Proj(v - v0)`` onto the per-sample L1 ball of radius ``fraction * scale_i``
    (the L1 projection commutes with scaling: Proj_{s r}(d) = s Proj_r(d / s))."""
    s = scale.view(-1, *([1] * (v.dim() - 1)))
    return v0 + s * project_l1_ball((v - v0) / s, fraction)


@register_attack("if_gmi")
class IFGMI(_ModelInversionBase):
    """IF-GMI (Qiu et al., ECCV 2024): latent, then block-input features in L1 balls, Poincaré loss."""

    summary = "IF-GMI (Qiu et al. 2024): intermediate-feature model inversion, L1 balls, Poincare loss"

    class Params(_MIParams):
        feature_steps: int | None = Field(None, ge=1, description="steps per feature stage; default iterations // 5")
        feature_lr: float = Field(0.01, gt=0, description="Adam step size on the block-input features")
        radii: list[float] = Field([0.02, 0.05], min_length=1, description="L1 radius per feature stage, as a "
                                   "fraction of the stage start's L1 norm; its length = how many feature stages")
        loss: Literal["poincare", "ce"] = Field("poincare", description="identity loss (PPA's loss_fkt): poincare "
                                                  "(IF-GMI's) or cross-entropy")
        initial_pool: int = Field(256, ge=0, description="PPA's initial selection: draw this many latents and start "
                                  "each class from those the target model finds most confident (0: random start)")

    def _latent0(self, inv: _Inversion) -> Tensor:
        """PPA/IF-GMI's initial selection: per class, the pool latents with the highest target confidence."""
        z = super()._latent0(inv)
        pool_size = self.params.initial_pool
        if pool_size == 0:
            return z
        pool = inv.prior.generator.sample_latent(pool_size, torch_generator(self.seed, "mi-pool")).to(self.device)
        with torch.no_grad():
            probs = torch.cat([inv.logits(inv.prior.render(pool[i:i + 64]), 4 * inv.passes).softmax(1)
                               for i in range(0, pool_size, 64)])
        for c in inv.targets.unique().tolist():
            slots = (inv.labels == c).nonzero().flatten()
            best = probs[:, c].topk(min(len(slots), pool_size)).indices
            z[slots[: len(best)]] = pool[best]
        return z

    def _search(self, inv: _Inversion, deadline: float | None,
                progress: ProgressFn | None) -> tuple[list[Tensor], list[Tensor], dict[str, float]]:
        p, gen = self.params, inv.prior.generator
        stages = min(len(p.radii), gen.num_blocks - 1)
        steps0, steps_k = self.budget.iterations, p.feature_steps or max(1, self.budget.iterations // 5)
        total = steps0 + stages * steps_k
        z0 = self._latent0(inv)
        norms = z0.flatten(1).norm(dim=1)
        loss_of = poincare_loss if p.loss == "poincare" else _cross_entropy

        def stage_loss(start: int) -> Callable[[Tensor], Tensor]:
            return lambda h: loss_of(inv.logits(inv.prior.render(h, start)), inv.labels).sum()

        run = optimize_variable(stage_loss(0), z0, steps=steps0, lr=p.lr, schedule="constant",
                                project=lambda z: spherical_projection(z, norms), deadline=deadline,
                                on_step=ticker(progress, steps0, total, 0))
        h, done, why = run.value, run.steps, run.stopped
        images, losses = [], []
        for k in range(stages + 1):
            with torch.no_grad():
                x = inv.prior.render(h, k)
            images.append(inv.pixels(x))
            losses.append(inv.selection_loss(x, loss_of, self.seed))
            if k == stages or why is not None:
                break
            with torch.no_grad():  # the next stage starts from block k's output under this stage's result
                h0 = gen.forward_blocks(h, k, k + 1)
            scale = h0.flatten(1).abs().sum(dim=1).clamp_min(1e-12)
            radius = p.radii[k]
            run = optimize_variable(stage_loss(k + 1), h0, steps=steps_k, lr=p.feature_lr, schedule="constant",
                                    project=lambda v, h0=h0, s=scale, r=radius: project_l1_relative(v, h0, r, s),
                                    deadline=deadline, on_step=ticker(progress, steps_k, total, steps0 + k * steps_k))
            h, done, why = run.value, done + run.steps, run.stopped
        if why == "non-finite loss" and len(images) > 1:  # a later stage diverged: keep the earlier stages
            why = None
        return images, losses, {"iterations": float(done), "stages": float(len(images)), **_stopped(why)}
