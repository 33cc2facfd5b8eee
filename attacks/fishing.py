"""Class fishing (Wen, Geiping, Fowl, Goldblum, Goldstein: "Fishing for User Data in Large-Batch Federated Learning
via Gradient Magnification", ICML 2022, Sec. 3.1), a weights-only manipulation of the last layer.

Manipulation. The server keeps the target class ``c``'s row of the classifier and sets every other row's weights to
0 and its bias to ``non_target_logit`` (large). Every example then puts probability ~0 on ``c``, so the gradient of
the mean loss with respect to the classifier's input is ``W_c^T (p_c - [y = c]) ~ -W_c`` for an example of class
``c`` and ~0 for every other one: the gradient of every layer below the classifier is that of the class-``c``
examples alone, a large batch reduced to the few examples of one class (gradient magnification). The bias
gradient of row ``c`` is ``mean_n (p_c - [y_n = c]) = -n_c / B``, so the count ``n_c`` is read off exactly.

Recovery. The magnified gradient is inverted with the Inverting Gradients machinery
(:func:`fedsim.attacks.inverting_gradients.input_steps`,
:func:`~fedsim.attacks.inverting_gradients.gradient_distance`, cosine distance, TV prior, signed boxed Adam; restarts
ranked by the masked gradient distance, in full or by successive halving: ``schedule``,
:mod:`fedsim.attacks.schedule`), for ``n_c`` dummy images labelled ``c``, matching every parameter except the
non-target classifier rows (whose gradient ``p_k x`` still mixes the whole batch). With ``n_c = 1`` the fished image
is a single-image inversion inside a batch of ``B``: since ``p_c ~ 0`` the magnified gradient is exactly ``1/B`` times
the target example's own gradient (cosine 1 up to float error), and cosine matching ignores the ``1/B``. With ``n_c >
1`` it returns ``min(n_c, max_images)`` images, a joint batch-``n_c`` inversion of the class's examples (harder, as
any multi-image inversion); with ``n_c = 0`` (the class is absent) it returns an empty reconstruction,
``stats["nothing_isolated"]`` saying why.

Measured (benchmarks/malicious_vs_ig.py, cifar10-mini, convnet width 16, 1000 iterations): see the benchmark's
docstring for fishing against IG on the same batch and against a trivial attacker, each on the target image.

Not implemented: the paper's feature fishing (splitting a class by a threshold on one feature, Sec. 3.2), which
needs a trained feature extractor and the gradients of two rounds (with and without the threshold) to isolate one
example of a frequent class; here the server picks a class and recovers all its examples. FedSGD only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import (
    Trial,
    gradient_distance,
    initial_inputs,
    input_steps,
    pixel_box,
    to_pixels,
)
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.attacks.objectives import OBJECTIVES
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
from fedsim.attacks.victim import check_update, rebuild_model, target_gradient, victim_model
from fedsim.errors import FedsimError, ScenarioError
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, ManipulationView, ModelFacts, Reconstruction, ServerModel


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(name, layer)`` of the model's last ``nn.Linear`` with a bias (its classifier), or None."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found if found is not None and found[1].bias is not None else None


@register_attack("fishing")
class Fishing(MaliciousAttack):
    """Class fishing: magnify one class's gradient through the last layer, then invert it with IG."""

    summary = "Fishing (Wen et al. 2022): last layer isolates one class's examples, then IG inverts them"
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd",)
    threat_model: ClassVar[str] = "F"
    assumes: ClassVar[tuple[str, ...]] = ("modifies only weights", "classifier is a Linear layer with bias")
    changes_architecture: ClassVar[bool] = False
    min_iterations: ClassVar[int] = 1

    class Params(AttackParams):
        target_class: int | None = Field(None, ge=0, description="class to fish; default drawn from the seed and "
                                         "round")
        non_target_logit: float = Field(100.0, gt=0, description="bias of every other class's row")
        max_images: int = Field(8, ge=1, description="invert at most this many examples of the class")
        lr: float = Field(0.1, gt=0, description="Adam step size on the normalized inputs (IG)")
        tv: float = Field(0.05, ge=0, description="weight of the total variation prior (IG; 0.05 measured best "
                          "of 0.001/0.01/0.05/0.1 on cifar10-mini)")
        init: Literal["randn", "rand", "zeros"] = Field("randn", description="dummy image start, in normalized "
                                                         "space (zeros: the dataset's mean colour)")
        schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """Refuse a model without a Linear classifier with bias, and a target class it does not have."""
        params = cls.Params.model_validate(spec.params)
        if classifier_layer(facts.model) is None:
            raise ScenarioError("model.name", "fishing needs a Linear classifier with bias as the last layer")
        if facts.task.kind != "classification":
            raise ScenarioError("data.dataset", "fishing needs a classification task")
        if params.target_class is not None and params.target_class >= facts.task.num_classes:
            raise ScenarioError("params.target_class", f"{params.target_class} is not a class of this task "
                                f"(0..{facts.task.num_classes - 1})")

    def _target(self, view_round: int, classes: int) -> int:
        if self.params.target_class is not None:
            return self.params.target_class
        return int(torch.randint(classes, (1,), generator=torch_generator(self.seed, "fishing", view_round)))

    def manipulate(self, view: ManipulationView) -> ServerModel:
        """The honest model with every classifier row but the target class's zeroed and biased up."""
        found = classifier_layer(rebuild_model(view.task, view.global_state))
        if found is None:
            raise ValueError("fishing: the model has no Linear classifier with bias")
        name, _ = found
        c = self._target(view.round, view.task.num_classes)
        state = {k: v.clone() for k, v in view.global_state.items()}
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[c] = False
        weight[others] = 0.0
        bias[others] = self.params.non_target_logit
        return ServerModel(state=state, note=f"class fishing on class {c}")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        if update.task.protocol != "fedsgd":
            return Reconstruction.failure("fishing inverts FedSGD gradients only")
        try:
            model = victim_model(update, self.device)
            target = target_gradient(update, model)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        found = classifier_layer(model)
        if found is None:
            return Reconstruction.failure("fishing: the model has no Linear classifier with bias")
        name, layer = found
        fished = torch.nonzero(layer.weight.detach().abs().sum(dim=1) > 0).flatten()
        if fished.numel() != 1:
            return Reconstruction.failure(f"fishing: the model sent has {fished.numel()} classifier rows with "
                                          "weights, not the one a class-fishing server keeps")
        c = int(fished[0])
        names = [n for n, _ in model.named_parameters()]
        count = round(-float(update.num_examples) * float(update.update[f"{name}.bias"][c]))
        if count < 1:  # the attack ran and isolated nothing: a measured empty result, not a failure
            empty = torch.empty((0, *update.task.input_shape))
            return Reconstruction(images=empty, labels=torch.empty(0, dtype=torch.long),
                                  stats={"target_class": float(c), "class_count": 0.0,
                                         "nothing_isolated": f"class {c} is not in the batch (its bias "
                                                             "gradient says 0 examples)",
                                         "seconds": time.perf_counter() - start})
        num = min(count, self.params.max_images)
        masks = _row_masks(names, name, model, c)
        target = _masked(target, masks)
        labels = torch.full((num,), c, dtype=torch.long, device=self.device)
        distance = OBJECTIVES["cosine"]
        tv = self.params.tv

        def loss_fn(x: Tensor) -> Tensor:
            loss = gradient_distance(model, x, labels, target, distance, transform=lambda g: _masked(g, masks))
            return loss + tv * total_variation(x) if tv > 0 else loss

        budget = self.budget
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        box = pixel_box(update.task.mean, update.task.std, self.device)
        book: RestartBook[Trial] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[Trial]:
            x0 = initial_inputs(self.params.init, (num, *update.task.input_shape),
                                torch_generator(self.seed, "fishing-ig", restart)).to(self.device)
            return input_steps(loss_fn, x0, iterations=budget.iterations, lr=self.params.lr, box=box,
                               deadline=deadline, on_step=on_step)

        def score(_restart: int, trial: Trial) -> float:  # the masked gradient distance alone
            return float(gradient_distance(model, trial.x, labels, target, distance, False,
                                           lambda g: _masked(g, masks)))

        spec = self.params.schedule
        cohort = Sequential(start_restart, score, lambda trial: trial.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(spec, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(spec, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None:
            return book.failure(seconds)
        stats = {**book.stats(), **schedule, "target_class": float(c), "class_count": float(count),
                 "seconds": seconds}
        return Reconstruction(images=to_pixels(book.best.x, update.task.mean, update.task.std), labels=labels.cpu(),
                              stats=stats)


def _row_masks(names: Sequence[str], layer: str, model: nn.Module, c: int) -> list[Tensor | None]:
    """Per parameter, None (match it all) or a 0/1 mask keeping only row ``c`` of the classifier ``layer``."""
    masks: list[Tensor | None] = []
    for n, p in zip(names, model.parameters(), strict=True):
        if n in (f"{layer}.weight", f"{layer}.bias"):
            m = torch.zeros_like(p)
            m[c] = 1.0
            masks.append(m)
        else:
            masks.append(None)
    return masks


def _masked(grads: Sequence[Tensor], masks: Sequence[Tensor | None]) -> list[Tensor]:
    """``grads`` with the non-target classifier rows zeroed (their gradient mixes every example of the batch)."""
    return [g if m is None else g * m for g, m in zip(grads, masks, strict=True)]
