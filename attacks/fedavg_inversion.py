"""Inverting FedAvg weight updates (Geiping, Bauermeister, Dröge, Moeller; NeurIPS 2020).

The client sends ``delta = theta_E - theta_0`` after E local SGD steps at learning rate ``lr`` on its
n examples. The attacker, granted the local hyperparameters (``knowledge.local_hparams``), replays
those steps on n dummy inputs (:func:`fedsim.attacks.unrolling.unrolled_delta`) and minimizes

    D_cos(delta_hat(x), delta) + alpha_TV * TV(x)

(the paper's eq. 4 with the single gradient replaced by the unrolled update, as in its FedAvg
experiments; ``FedAvgReconstructor`` in ``inversefed``) with Inverting Gradients' optimizer: Adam
on the sign of the input gradient, projection onto the pixel box, lr x0.1 at 3/8, 5/8 and 7/8 of
the iterations. n is ``update.num_examples`` (the examples the client used in the round). Step i
is assumed to use dummy slice ``i mod ceil(n / bs)``: the client's shuffling seed is unknown (see
:mod:`fedsim.attacks.unrolling`). The weight decay, if granted, is replayed too.

Labels are granted or inferred from ``-delta``'s last layer; which labels met which local step is
unknown, so restarts after the first try other label orders over the slices, and the restart with
the smallest delta distance wins (never ground truth); ``schedule`` (:mod:`fedsim.attacks.schedule`) runs
them in full or by successive halving on that distance. Only plain SGD can be unrolled here:
a scenario whose clients use Adam or momentum is refused, and an update whose granted
hyperparameters say so fails. ``budget.iterations`` are Adam steps, each one unrolled round.

**DP-SAT-aware** (``knowledge.defense`` and a ``dp_sat`` client, spec ``algorithms-more.md`` §10.2, §10.7):
each simulated step's gradient is taken at ``theta_t + rho * g_{t-1} / |g_{t-1}|``, ``g_{t-1}`` the
attacker's own previous simulated gradient (``variant: momentum``: along the last simulated update),
the first step of the round unperturbed (:class:`fedsim.attacks.unrolling.Sharpness`). With ``persist: true``
the client's first step is perturbed along its previous round's last direction, which the server never
saw: that step stays unperturbed here, and the outcome says so (``stats["sharpness_first_step_unknown"]``).
Noise and clipping are not modelled. A validation error refuses ``knowledge.defense`` without ``dp_sat``.
(Under fedsgd a DP-SAT client's single step is perturbed only with ``persist``, along its previous round's
sent gradient, which the view of one update does not carry: gradient-matching attacks then match at
``x_r``, unaware.) DIFF2's gradient differences cannot be unrolled: such an update fails (a DIFF2
scenario is fedsgd, which this attack refuses anyway).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import Trial, initial_inputs, input_steps, pixel_box, to_pixels
from fedsim.attacks.matching import LabelStrategy, examples_to_reconstruct, labels_for, local_schedule, unusable
from fedsim.attacks.objectives import OBJECTIVES, Distance
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import RestartBook
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
from fedsim.attacks.unrolling import Sharpness, label_assignments, unrolled_delta
from fedsim.attacks.victim import target_gradient, victim_model
from fedsim.errors import FedsimError, ScenarioError
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction
from fedsim.training import min_train_batch


def unrollable(hyperparams: Mapping[str, Any]) -> str | None:
    """Why a client with these local hyperparameters cannot be unrolled (unknown, not plain SGD), or ``None``."""
    if not hyperparams:
        return "the local hyperparameters are not known (grant knowledge.local_hparams: true)"
    optimizer = hyperparams.get("optimizer", "sgd")
    if optimizer != "sgd":
        return f"the client trains with {optimizer!r}; only plain SGD steps can be unrolled"
    if float(hyperparams.get("momentum", 0.0) or 0.0) != 0.0:
        return f"the client uses SGD with momentum {hyperparams['momentum']}; only plain SGD can be unrolled"
    if not float(hyperparams.get("lr", 0.0)) > 0:
        return f"the local learning rate {hyperparams.get('lr')!r} is not a positive number"
    return None


#: Defenses whose perturbed point the unrolling models (their descriptions carry ``rho``, ``variant``, ``persist``).
SHARPNESS_DEFENSES = ("dp_sat",)


def sharpness_of(descriptions: Sequence[Mapping[str, Any]]) -> tuple[Sharpness | None, bool]:
    """DP-SAT's perturbation from the described defenses (``update.defenses``, granted by
    ``knowledge.defense``): ``(Sharpness or None, whether the client's first step was perturbed along a
    direction the attacker cannot know)``, the latter under ``persist: true``."""
    for description in descriptions:
        if description.get("name") in SHARPNESS_DEFENSES:
            rho = float(description.get("rho", 0.0) or 0.0)
            variant = description.get("variant", "sat")
            return Sharpness(rho, variant), bool(description.get("persist", False)) and rho > 0
    return None, False


@register_attack("fedavg_inversion")
class FedAvgInversion(Attack):
    """Unrolled local SGD steps, cosine-matched to the weight delta, with IG's optimizer and TV prior."""

    summary = "FedAvg inversion (Geiping et al. 2020): unroll the client's local SGD steps, match the delta"
    protocols = ("fedavg",)
    needs = {"local_hparams": True}
    #: The SoK's letter for FedAvg inversion (Dimitrov et al. 2022; Geiping et al. 2020's unrolling): the local
    #: learning rate, steps and batch size are C's training details, granted by knowledge.local_hparams (``needs``).
    threat_model = "C"
    assumes = ("the clients' local learning rate, steps, batch size and plain-SGD optimizer (local_hparams)",)
    simulates_defenses = SHARPNESS_DEFENSES  # knowledge.defense: DP-SAT's perturbed point in every unrolled step

    class Params(AttackParams):
        lr: float = Field(0.1, gt=0, description="Adam step size on the normalized inputs")
        tv: float = Field(0.01, ge=0, description="weight of the mean-form total variation prior")
        distance: Literal["cosine", "l2", "l1"] = Field("cosine", description="distance of the deltas")
        signed: bool = Field(True, description="step on the sign of the input gradient")
        boxed: bool = True
        init: Literal["randn", "rand", "zeros"] = "randn"
        decay: Literal["step", "none"] = Field("step", description="lr x0.1 at 3/8, 5/8, 7/8")
        label_strategy: LabelStrategy = Field("auto", description="label inference when labels are not known")
        schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        super().check_scenario(scenario, spec)
        local = scenario.federation.local
        reason = unrollable({"optimizer": local.optimizer, "momentum": local.momentum, "lr": local.lr})
        if reason is not None:
            field = "optimizer" if local.optimizer != "sgd" else "momentum"
            raise ScenarioError(f"federation.local.{field}", f"{spec.name}: {reason}")
        if spec.knowledge.defense and not any(d.name in cls.simulates_defenses for d in scenario.defenses):
            raise ScenarioError("knowledge.defense", f"true switches on {spec.name}'s defense-aware mode, which "
                                f"models {', '.join(cls.simulates_defenses)} only, and the scenario has none; "
                                "set it to false")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget) or unrollable(update.hyperparams)
        if reason is not None:
            return Reconstruction.failure(reason)
        p, budget, hp = self.params, self.budget, update.hyperparams
        num = examples_to_reconstruct(update)
        distance: Distance = OBJECTIVES[p.distance]
        try:
            model = victim_model(update, self.device)
            # a victim that cannot train on one example had a pass's lone last example merged (as the client)
            min_batch = min_train_batch(model, tuple(update.task.input_shape))
            steps, batch_size = local_schedule(hp, num, min_batch)
            target = [-t for t in target_gradient(update, model)]  # delta on the parameters
            labels = labels_for(update, num, known=self.knowledge.labels == "known",
                                strategy=p.label_strategy, model=model).to(self.device)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        lr, wd = float(hp["lr"]), float(hp.get("weight_decay", 0.0) or 0.0)
        sharpness, first_unknown = sharpness_of(update.defenses)

        def delta_loss(x: Tensor, labels: Tensor) -> Tensor:
            delta = unrolled_delta(model, x, labels, lr=lr, steps=steps, batch_size=batch_size, weight_decay=wd,
                                   min_batch=min_batch, sharpness=sharpness)
            return distance(delta, target)

        box = pixel_box(update.task.mean, update.task.std, self.device) if p.boxed else None
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        orders = label_assignments(labels, budget.restarts, batch_size, torch_generator(self.seed, "fedavg-labels"),
                                   min_batch)
        book: RestartBook[Trial] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[Trial]:
            gen = torch_generator(self.seed, "fedavg_inversion", restart)
            x0 = initial_inputs(p.init, (num, *update.task.input_shape), gen).to(self.device)
            order = orders[restart]

            def loss_fn(x: Tensor) -> Tensor:
                loss = delta_loss(x, order)
                return loss + p.tv * total_variation(x) if p.tv > 0 else loss

            return input_steps(loss_fn, x0, iterations=budget.iterations, lr=p.lr, signed=p.signed, box=box,
                               decay=p.decay, deadline=deadline, on_step=on_step)

        def score(restart: int, trial: Trial) -> float:  # the delta distance alone, under the restart's label order
            return delta_loss(trial.x, orders[restart]).item()

        cohort = Sequential(start_restart, score, lambda trial: trial.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(p.schedule, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds)
        trial = book.best
        labels = orders[book.best_restart]
        stats = {**book.stats(), **schedule, "iterations": float(trial.iterations), "local_steps": float(steps),
                 "seconds": seconds}
        if sharpness is not None:
            stats.update(sharpness_rho=sharpness.rho, sharpness_first_step_unknown=float(first_unknown))
        images = to_pixels(trial.x, update.task.mean, update.task.std)
        return Reconstruction(images=images, labels=labels.cpu(), stats=stats)
