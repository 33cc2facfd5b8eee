"""The attack protocol and registry.

An attack is built from its validated ``Params``, the scenario's declared :class:`Knowledge`, its
:class:`Budget`, a device and a seed. ``reconstruct`` receives one :class:`ClientUpdate` and
nothing else: no ground truth ever reaches it (breaching's firewall, made structural here).
Before the federation runs, ``check_scenario`` refuses scenarios whose threat model does not grant
what the attack needs, with a message saying what to grant.

Model-inversion attacks (``target = "model"``, base :class:`ModelInversionAttack`) attack the global
model released after a round instead: ``invert`` receives a :class:`ReleasedModel` and nothing else.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedsim.attacks.differences import DIFFERENCE_DEFENSES, difference_defense, difference_rounds
from fedsim.attacks.label_recovery import classifier_input, label_rule_problem
from fedsim.errors import ScenarioError, ThreatModelError
from fedsim.isolation import seeded_method
from fedsim.registry import Registry
from fedsim.scenario import AttackSpec, Budget, Knowledge, Scenario
from fedsim.threat import ClientUpdate, ModelFacts, Reconstruction, ReleasedModel
from fedsim.yaml_literal import yaml_repr

ProgressFn = Callable[[int, int], None]  # (iterations done, iterations total)


def _refusing_differences(fn: Callable[..., Reconstruction]) -> Callable[..., Reconstruction]:
    """``reconstruct`` that fails, with the reason, on a gradient-difference update (``reference_state``
    set) when its class does not match differences (:attr:`Attack.matches_differences`)."""

    @functools.wraps(fn)
    def wrapper(self: Attack, update: ClientUpdate, *args: Any, **kwargs: Any) -> Reconstruction:
        if getattr(update, "reference_state", None) is not None and not type(self).matches_differences:
            return Reconstruction.failure(f"{type(self).__name__} cannot match a gradient difference (a DIFF2 "
                                          "difference round): it would read it as a plain gradient")
        return fn(self, update, *args, **kwargs)

    return wrapper


class AttackParams(BaseModel):
    """Base of every attack's parameter block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Attack(ABC):
    """Base class of attack plug-ins."""

    Params: ClassVar[type[AttackParams]] = AttackParams
    #: Protocols whose updates this attack can invert.
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd", "fedavg")
    #: Input kinds (``fedsim.data.catalog.InputKind``) whose data this attack reconstructs: images by default;
    #: text attacks declare ``("tokens",)``. Validation refuses an attack on a dataset of another kind.
    inputs: ClassVar[tuple[str, ...]] = ("image",)
    #: Knowledge the attack cannot run without, e.g. {"local_hparams": True, "labels": "known"}.
    needs: ClassVar[dict[str, Any]] = {}
    #: One line for `fedsim list` and reports.
    summary: ClassVar[str] = ""
    #: Whether ``knowledge.defense`` switches on a defense-aware mode (modelling the listed defenses'
    #: deterministic parts, :mod:`fedsim.attacks.defense_aware`); such a mode is refused when no defense of the
    #: scenario has anything to model.
    models_defenses: ClassVar[bool] = False
    #: The fewest ``budget.iterations`` a scenario may give it (validation refuses fewer); an attack that
    #: does not optimize (an analytic one) sets 0.
    min_iterations: ClassVar[int] = 1
    #: What the attack reads: "update" (a captured client update, ``reconstruct``) or "model" (the
    #: released global model, ``invert``; see :class:`ModelInversionAttack`).
    target: ClassVar[str] = "update"
    #: Whether every dummy message it matches is computed from the model :func:`fedsim.attacks.victim.victim_model`
    #: rebuilt, through :func:`fedsim.attacks.inverting_gradients.gradient_distance` or
    #: :func:`fedsim.attacks.batched.parameter_gradient` (:mod:`fedsim.attacks.differences`), so it matches DIFF2's
    #: gradient differences as differences. An update attack that does not (analytic rules, unrolled local
    #: training, dropout masks) is refused in a DIFF2 scenario and fails on a difference update.
    matches_differences: ClassVar[bool] = False
    #: Defenses it models in its own simulation of the client rather than through ``attacker_transform``
    #: (e.g. FedAvg inversion: DP-SAT's perturbed point); they count as modelable for ``knowledge.defense``.
    simulates_defenses: ClassVar[tuple[str, ...]] = ()
    #: The SoK threat model (A-H, :mod:`fedsim.threat_models`) the attack needs; validation refuses a scenario that
    #: does not grant it. Override :meth:`threat_model_for` when the attack's parameters change it.
    threat_model: ClassVar[str] = "B"
    #: What it assumes beyond its letter, in plain words for ``fedsim list`` and reports, e.g.
    #: ("modifies the architecture", "labels known"). The SoK's footnotes: architecture vs weights-only changes,
    #: auxiliary data, BN statistics.
    assumes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every ``reconstruct``/``invert`` a subclass defines runs with the global RNGs seeded from the
        attack's seed and restored afterwards (:func:`fedsim.isolation.seeded_method`): a stochastic
        victim (MID's bottleneck) draws the same numbers on every call, whatever ran before in the
        process, and the attack leaves the caller's generators as they were."""
        super().__init_subclass__(**kwargs)
        for name in ("reconstruct", "invert"):
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "__seeded__", False):
                setattr(cls, name, seeded_method(_refusing_differences(fn) if name == "reconstruct" else fn))

    def __init__(
        self,
        params: AttackParams,
        knowledge: Knowledge,
        budget: Budget,
        device: torch.device,
        seed: int,
    ) -> None:
        self.params = params
        self.knowledge = knowledge
        self.budget = budget
        self.device = device
        self.seed = seed

    @classmethod
    def threat_model_for(cls, params: AttackParams, knowledge: Knowledge) -> str:
        """The SoK letter this attack needs with these ``params`` and ``knowledge`` (default :attr:`threat_model`)."""
        return cls.threat_model

    @classmethod
    def from_spec(cls, spec: AttackSpec, device: torch.device, seed: int) -> Attack:
        return cls(cls.Params.model_validate(spec.params), spec.knowledge, spec.budget, device, seed)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        """Refuse a scenario whose protocol or threat model does not fit this attack."""
        protocol = scenario.federation.protocol
        if protocol not in cls.protocols:
            raise ScenarioError("federation.protocol", f"{spec.name} inverts {' or '.join(cls.protocols)} updates, "
                                f"and this scenario has {protocol!r}")
        for key, wanted in cls.needs.items():
            granted = getattr(spec.knowledge, key)
            if granted != wanted:
                raise ScenarioError(f"knowledge.{key}", f"{spec.name} needs {yaml_repr(wanted)}, but the threat "
                                    f"model grants {yaml_repr(granted)}")
        if spec.knowledge.bn_stats == "client":
            raise ScenarioError("knowledge.bn_stats", "'client' (the client's own batch statistics) cannot be "
                                "granted: no update carries them and the runner hands none over; use 'running' "
                                "(the global model's statistics) or 'none'")
        if cls.target == "update" and difference_defense(scenario) is not None:
            cls._check_differences(scenario, spec)
        if spec.knowledge.defense and cls.models_defenses:
            from fedsim.attacks.defense_aware import unmodelable

            also = (*cls.simulates_defenses, *(DIFFERENCE_DEFENSES if cls.matches_differences else ()))
            why = unmodelable(scenario, also)
            if why is not None:
                raise ScenarioError("knowledge.defense", f"true switches on {spec.name}'s defense-aware mode, but "
                                    f"{why}; set it to false")

    @classmethod
    def _check_differences(cls, scenario: Scenario, spec: AttackSpec) -> None:
        """Refuse a DIFF2 scenario this attack cannot attack: one that does not match differences
        (:attr:`matches_differences`), or label inference on a targeted difference round (the labels
        cancel from a difference's last layer, :data:`fedsim.attacks.label_recovery.DIFFERENCE_LABELS`)."""
        name = difference_defense(scenario).name
        if not cls.matches_differences:
            raise ThreatModelError(f"{spec.name} cannot match the gradient differences {name} clients send (it "
                                   "reads the update as a plain gradient or weight delta); use a gradient-matching "
                                   "attack such as inverting_gradients")
        infers = "label_strategy" in cls.Params.model_fields and spec.knowledge.labels != "known"
        diff_rounds = difference_rounds(scenario, spec.target_rounds(scenario.federation.rounds))
        if infers and diff_rounds:
            raise ScenarioError("knowledge.labels", f"'infer' cannot work in {name}'s difference rounds "
                                f"(targeted: {diff_rounds[:5]}): the labels cancel from a gradient difference's "
                                "last layer; grant labels: known, or target restart rounds only")

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """Refuse options whose precondition the server's built model does not meet (run at validation by
        :func:`fedsim.attack_checks.check_attack_preconditions`, with the data; raise
        :class:`ScenarioError` with a path relative to the attack spec, e.g. ``params.label_strategy``).

        The default checks ``params.label_strategy`` when labels are inferred
        (:func:`fedsim.attacks.label_recovery.label_rule_problem`, on
        :func:`~fedsim.attacks.label_recovery.classifier_input`
        of ``facts.model``); subclasses extend it.
        """
        strategy = getattr(cls.Params.model_validate(spec.params), "label_strategy", None)
        if strategy is None or spec.knowledge.labels == "known":
            return
        classifier = classifier_input(facts.model, tuple(facts.task.input_shape))
        targets = [c for c in spec.target_clients(scenario.federation.clients) if c in facts.examples]
        fewest = min((facts.examples[c] for c in targets), default=1)
        problem = label_rule_problem(strategy, classifier, fewest, facts.task.num_classes)
        if problem is not None:
            raise ScenarioError("params.label_strategy", f"{spec.name}: {problem}")

    @abstractmethod
    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Reconstruct the client's data from what the server observed."""


class ModelInversionParams(AttackParams):
    """Parameters every model-inversion attack takes: which classes to invert and how many images each."""

    target_classes: list[int] | None = Field(None, min_length=1, description="classes to invert; default all")
    samples_per_class: int = Field(1, ge=1, le=64, description="images to produce per target class")


class ModelInversionAttack(Attack):
    """Base of attacks on the released global model (``target = "model"``): implement ``invert``.

    They run once per attacked round on the model released after it (default: the final round);
    ``clients`` means nothing to them, and ``check_scenario`` refuses it when set.
    """

    Params: ClassVar[type[AttackParams]] = ModelInversionParams
    target: ClassVar[str] = "model"

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        super().check_scenario(scenario, spec)
        if "clients" in spec.model_fields_set:
            raise ScenarioError("clients", f"{spec.name} inverts the released global model, not a client's update: "
                                "remove its 'clients' field")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Not applicable: a model-inversion attack never reads a client update."""
        return Reconstruction.failure(f"{type(self).__name__} attacks the released model; call invert()")

    def invert(self, model: ReleasedModel, target_classes: list[int],
               progress: ProgressFn | None = None) -> Reconstruction:
        """Images in [0, 1] that the released model assigns to ``target_classes`` (labels = those classes,
        ``samples_per_class`` images each, in class order)."""
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack")
register_attack = ATTACKS.register
