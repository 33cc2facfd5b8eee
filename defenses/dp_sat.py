"""DP-SAT: differentially private sharpness-aware training (Park, Kim, Choi, Lee, ICML 2023, arXiv 2306.05651).

DP-SGD (:mod:`fedsim.defenses.dp_sgd`, same parameters, sampling, accountant and per-sample modes) whose
per-example gradients at logical step t are taken at a perturbed point (spec
``shared/reference/algorithms-more.md`` section 10.2):

1. ``e_t = rho * g~_{t-1} / ||g~_{t-1}||_2`` (global L2 norm over all trainable parameters), with
   ``g~_{t-1}`` the previous step's PRIVATIZED gradient (after Opacus's clip, noise and scaling; before
   the base optimizer's momentum);
2. per-example gradients at ``w_t + e_t``, clipped, summed, noised and scaled as DP-SGD does: ``g~_t``;
3. ``w_t`` restored exactly, then the base optimizer steps with ``g~_t``; ``g~_t`` kept for step t+1.

``variant: momentum`` (the official code's ``DPSATMomentum``) perturbs along the last update instead:
``e_t = rho (w_{t-1} - w_t) / ||w_{t-1} - w_t||`` (momentum included).

Privacy: ``e_t`` is computed from released outputs only (post-processing), so epsilon is exactly
DP-SGD's: one subsampled Gaussian per step, the same accountant, q and steps. Compute: one
per-example-gradient pass per step, as DP-SGD.

How it sits on the DP-SGD round (``_PrivateRound`` extension points): ``e_t`` is applied before the
step's first forward pass (ghost clipping's two backward passes then both run at ``w + e``), at most
once per logical step (:class:`fedsim.defenses.sharpness.Perturbation`); it is removed at the end of
``pre_step`` (the accountant's step hook), i.e. before the base optimizer steps (fedavg) or the
gradient is read (fedsgd), so fedsgd sends the privatized gradient at the perturbed point.

Rounds: each round's first step is unperturbed (``g~ = 0``) unless ``persist: true``, which keeps the
last ``g~`` (momentum: the last update) in the client's state (``dp_sat/prev-direction``, a flat tensor)
and perturbs the next round's first step with it (stale: it was computed at the previous global model).
fedsgd takes one step a round, so it needs ``persist: true`` (else DP-SAT is DP-SGD) and the sat variant.

Metrics beside DP-SGD's: ``perturbed_steps`` (steps of the round taken at ``w + e``) and
``cos_prev_grad``, the mean over steps of ``cos(g~_{t-1}, g_t)`` with ``g_t`` the clipped, un-noised
sum at step t (Opacus's ``p.summed_grad``): near 0, the perturbation direction is mostly noise
(spec 10.6); nan when no step of the round had a previous gradient (e.g. fedsgd's first round).

The curious server's view is a DP-SGD client's: a noisy update; ``rho`` and the variant are public
(``public_description``), so a defense-aware attacker may model the perturbed point.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import register_defense
from fedsim.defenses.dp_sgd import DPSGD, DPSGDParams, _PrivateRound
from fedsim.defenses.sharpness import Perturbation, cosine, flat
from fedsim.errors import ScenarioError
from fedsim.scenario import DefenseSpec, Scenario
from fedsim.training import TrainingJob


class DPSATParams(DPSGDParams):
    rho: float = Field(0.03, ge=0, description="perturbation radius, absolute in parameter space (L2)")
    variant: Literal["sat", "momentum"] = Field(
        "sat", description="perturb along the previous privatized gradient (sat) or the last update (momentum)")
    persist: bool = Field(False, description="keep the last direction across rounds (else each round's first "
                                             "step is unperturbed)")


class _SATRound(_PrivateRound):
    """A DP-SGD round whose per-example gradients are taken at ``w + e_t`` (module doc)."""

    def __init__(self, defense: DPSAT, job: TrainingJob) -> None:
        super().__init__(defense, job)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.perturbation = Perturbation(self.trainable)
        stored = job.state.get(self.direction_key)
        if not self.p.persist:
            job.state.pop(self.direction_key, None)
        carried = stored if self.p.persist and isinstance(stored, Tensor) else None
        momentum = self.p.variant == "momentum"
        self.prev_grad: Tensor | None = None if momentum else carried  # g~_{t-1}, flat
        self.last_update: Tensor | None = carried if momentum else None  # w_{t-1} - w_t, flat
        self.anchor: list[Tensor] | None = None  # w_t of the last step taken (for the momentum variant)
        self.cosines: list[float] = []
        self.perturbed_steps = 0

    @property
    def direction_key(self) -> str:
        return f"{self.defense.name}/prev-direction"

    def before_forward(self, x: Tensor) -> None:
        if self.perturbation.active:
            return  # this logical step is already at w + e_t
        if self.p.variant == "momentum":
            if self.anchor is not None:  # weights now hold w_{t}; the anchor w_{t-1}
                self.last_update = flat(self.anchor) - flat(self.trainable)
            direction = self.last_update
        else:
            direction = self.prev_grad
        if self.perturbation.apply(direction, self.p.rho):
            self.perturbed_steps += 1

    def after_privatize(self, optimizer: object) -> None:
        privatized = flat([p.grad for p in self.trainable])  # g~_t: clipped, noised, scaled
        clipped = flat([p.summed_grad for p in self.trainable])  # the clipped sum, no noise
        if self.prev_grad is not None:
            cos = cosine(self.prev_grad.to(clipped.device), clipped)
            if cos is not None:
                self.cosines.append(cos)
        self.anchor = self.perturbation.remove()  # exactly w_t, before the base step
        self.prev_grad = privatized.clone()

    def on_round_end(self) -> dict[str, float]:
        if self.p.persist:
            direction = self.prev_grad
            if self.p.variant == "momentum":
                direction = (flat(self.anchor) - flat(self.trainable)) if self.anchor is not None else self.last_update
            if direction is not None:
                self.job.state[self.direction_key] = direction.detach().cpu().clone()
        # every client reports the same keys (Flower aggregates them): nan when no step had a previous gradient
        cos = sum(self.cosines) / len(self.cosines) if self.cosines else float("nan")
        return {"perturbed_steps": float(self.perturbed_steps), "cos_prev_grad": cos}


@register_defense("dp_sat")
class DPSAT(DPSGD):
    Params = DPSATParams
    summary = "DP-SAT (Park et al. 2023): DP-SGD with per-example gradients at w + rho * g~_prev/|g~_prev|"
    round_class = _SATRound

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        super().check_scenario(scenario, spec)
        p = cls.Params.model_validate(spec.params)
        if scenario.federation.protocol != "fedsgd":
            return
        if p.variant == "momentum":
            raise ScenarioError("params.variant", "momentum perturbs along the client's last local update, and "
                                "fedsgd takes no local step: use variant: sat (with persist: true) or fedavg")
        if not p.persist:
            raise ScenarioError("params.persist", "fedsgd takes one step a round, the first, which DP-SAT leaves "
                                "unperturbed (it would be dp_sgd): set persist: true to perturb it along the "
                                "client's previous privatized gradient, or use fedavg")
