"""The defense protocol, its four hook points, and the registry.

| hook                | where it runs (Flower)                         | example                       |
|---------------------|-----------------------------------------------|-------------------------------|
| ``transform_model`` | model factory shared by client and server apps | MID bottleneck, BN -> GN      |
| ``wrap_training``   | inside the ClientApp's train function         | Opacus DP-SGD                 |
| ``transform_update``| on the client, on the update it is about to send | clipping, noise, pruning    |
| ``wrap_strategy``   | around the server strategy                    | Flower central DP, SecAgg     |
| ``server_update``   | the FedSGD server step, on both server paths  | DIFF2's gradient estimator    |
| ``inspect_model``   | on the client, on the model it received       | refusing a changed architecture |

Several defenses compose in a fixed order: by ``stage`` (lower first), then by their order in the
scenario. ``transform_update`` returns the new update plus the randomness it drew (e.g. the noise
tensor), which is recorded as ground truth for the evaluator only.

``server_update`` runs where the server turns the mean of the clients' fedsgd messages into the next global
model, on the plain path (:class:`fedsim.simulation.strategies.FedSGD`) and under SecAgg+
(:mod:`fedsim.simulation.secure`) alike, through :func:`fedsim.simulation.strategies.server_step`; with it come
:attr:`Defense.uniform_mean`, :attr:`Defense.every_client_reason`, :attr:`Defense.full_partition_messages` and
:meth:`Defense.message_reference` (what the capture records as the reference model of a gradient difference).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from fedsim.errors import IncompatibleDefenseError
from fedsim.registry import Registry
from fedsim.scenario import DefenseSpec, Scenario
from fedsim.training import TrainingJob


class DefenseParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class UpdateContext:
    """Facts a client-side update transform may use; its randomness must derive from these."""

    seed: int
    round: int
    partition_id: int
    protocol: str
    num_examples: int
    #: the client's persistent state (``Context.state``, read and written in place): only ``inspect_model`` gets
    #: it, e.g. a model check's statistics of the last model this client received; keys are the defense's own
    state: dict = field(default_factory=dict, compare=False, repr=False)


class Defense:
    """Base class of defense plug-ins: every hook is optional and defaults to 'do nothing'."""

    Params: ClassVar[type[DefenseParams]] = DefenseParams
    stage: ClassVar[int] = 50  # composition order: model (10) < training (30) < update (50) < server (70)
    summary: ClassVar[str] = ""
    #: The parameters ``transform_model`` reads (the architecture it builds depends on nothing else).
    model_params: ClassVar[tuple[str, ...]] = ()
    #: The plain server path averages the replies uniformly instead of by num-examples (a server-side noise
    #: calibrated to the unweighted mean; SecAgg+ always weights, see :mod:`fedsim.simulation.secure`).
    uniform_mean: ClassVar[bool] = False
    #: Why this defense needs every client's update in every round ("" when it does not): the first failed
    #: client then stops the run on both server paths (:mod:`fedsim.simulation.participation`).
    every_client_reason: ClassVar[str] = ""
    #: fedsgd messages cover the client's whole partition (num-examples up to the partition size, not the batch).
    full_partition_messages: ClassVar[bool] = False
    #: ``transform_update`` may run between a DP mechanism's clipping and its noise without breaking the sensitivity
    #: bound the noise is calibrated to: it never moves two messages further apart (``||T(a) - T(b)|| <= ||a - b||``,
    #: e.g. clipping, a projection onto a ball) or it only adds noise drawn independently of the data (what is
    #: released is then a post-processing of the mechanism's release). False, the safe default, for anything else:
    #: pruning or quantization can move two neighbouring messages much further apart than the bound.
    sensitivity_preserving: ClassVar[bool] = False
    #: The defense gives sample-level DP inside the clients and takes ``audit:`` example canaries
    #: (:mod:`fedsim.audit.canaries`): dp_sgd, dp_sat, dp_sam, diff2.
    audits_examples: ClassVar[bool] = False
    #: Input kinds (``fedsim.data.catalog.InputKind``) this defense can run on: all by default; validation refuses
    #: it at ``defenses[i]`` on a dataset of another kind, giving :attr:`inputs_reason` (e.g. Soteria's scores are
    #: derivatives with respect to a continuous input, which token ids are not).
    inputs: ClassVar[tuple[str, ...]] = ("image", "tabular", "tokens")
    inputs_reason: ClassVar[str] = ""

    def __init__(self, params: DefenseParams, name: str, scenario: Scenario | None = None) -> None:
        self.params = params
        self.name = name
        self.scenario = scenario  # the whole scenario, e.g. for rounds and client sampling rates

    @classmethod
    def from_spec(cls, spec: DefenseSpec, scenario: Scenario | None = None) -> Defense:
        return cls(cls.Params.model_validate(spec.params), spec.name, scenario)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        """Raise IncompatibleDefenseError when this defense cannot run in the scenario."""

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Validation with the data at hand (``fedsim.preflight``): raise IncompatibleDefenseError when this
        defense cannot train ``model`` (the global model after every ``transform_model``) on inputs of
        ``input_shape`` (C, H, W). Must leave ``model`` and the global RNG as they were."""

    def transform_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_training(self, job: TrainingJob) -> TrainingJob:
        """Change how the client trains (loss, optimizer, model wrapper); runs on every client."""
        return job

    def transform_update(
        self, update: dict[str, Tensor], ctx: UpdateContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return update, {}

    def wrap_strategy(self, strategy: Any) -> Any:
        return strategy

    def client_mods(self) -> list[Any]:
        """Flower ClientApp mods ``(msg, ctx, call_next) -> Message`` for the train function, e.g.
        ``fixedclipping_mod`` paired with Flower's client-side DP wrapper. Mods of all defenses run in
        composition order (DP mods should come last: give such defenses a late ``stage``)."""
        return []

    def attacker_transform(self, update: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The deterministic part of ``transform_update`` (clipping, a pruning rule), which a
        defense-aware attacker may apply to its own dummy update before matching; None when the
        defense has no deterministic part to model (e.g. pure noise)."""
        return None

    def server_update(self, server_round: int, current: dict[str, Tensor], mean_message: dict[str, Tensor],
                      memory: dict[str, Any]) -> dict[str, Tensor] | None:
        """fedsgd: the global model after ``server_round`` (every key of ``current``), from the model the clients
        received (``current``, the full state) and the mean of their messages (``mean_message``: trainable
        parameter name -> tensor); None for the default step ``current - lr * mean``. ``memory`` is this
        defense's dict on the server for one run (empty in round 1), e.g. a running estimator. Runs on both
        server paths: uniform mean on the plain path when :attr:`uniform_mean`, num-examples-weighted under SecAgg+."""
        return None

    def message_reference(self, server_round: int) -> bool:
        """Whether the clients' messages of ``server_round`` are gradient DIFFERENCES taken against the previous
        round's global model (DIFF2): the capture then records that model as the update's ``reference_state``."""
        return False

    def inspect_model(self, received: nn.Module, agreed: nn.Module, architecture: tuple[Mapping[str, Any], ...],
                      ctx: UpdateContext) -> dict[str, float]:
        """A client-side check of the model the server sent, before any training (both client paths).

        ``received``: the model the client is about to train, with the server's weights loaded, after the
        ``architecture`` changes the message carried (() for the agreed architecture); ``agreed``: the agreed
        architecture (the scenario's model after model-shaping defenses) with the client's copy of the initial
        weights. Return metrics for the reply (e.g. ``{"model_check_flagged": 1.0}``); raise
        :class:`fedsim.errors.ModelRefusedError` to refuse the model: the client then sends no update and the
        round records it as a failure with that reason."""
        return {}

    def server_round_metrics(self, server_round: int) -> dict[str, float]:
        """Metrics for the server's per-round history row, e.g. central DP's epsilon so far."""
        return {}

    def public_description(self) -> Mapping[str, Any]:
        """What a defense-aware attacker is told about this defense (name and parameters)."""
        return {"name": self.name, **self.params.model_dump()}

    def model_description(self) -> Mapping[str, Any]:
        """What rebuilding the model needs to know of this defense's ``transform_model``: its name and the
        :attr:`model_params` it reads. Every attack receives this (``TaskInfo.model_transforms``), with or
        without ``knowledge.defense``, so it must hold nothing else (e.g. no noise scale)."""
        return {"name": self.name, **{key: getattr(self.params, key) for key in self.model_params}}


DEFENSES: Registry[type[Defense]] = Registry("defense")
register_defense = DEFENSES.register


def check_transforms_before_noise(scenario: Scenario, spec: DefenseSpec, noise_stage: float, why: str) -> None:
    """Refuse a DP mechanism (``spec``, a defense of ``scenario``) whose noise is calibrated to a sensitivity bound on
    the client's message, when a defense whose ``transform_update`` runs after that bound is set and before the noise
    is added is not :attr:`Defense.sensitivity_preserving` (the bound, hence the reported epsilon, would not hold).

    ``noise_stage``: the stage at which the noise is added on the client (transforms of a lower stage, or of the same
    stage earlier in the scenario, run before it); ``math.inf`` when the server adds it, after every client transform.
    ``why``: the mechanism's sensitivity, for the message. Raises IncompatibleDefenseError naming the transform's
    ``defenses[i]`` entry.
    """
    mine = next(i for i, d in enumerate(scenario.defenses) if d is spec)
    for i, other in enumerate(scenario.defenses):
        if i == mine or other.name not in DEFENSES:
            continue
        kind = DEFENSES.get(other.name)
        if kind.transform_update is Defense.transform_update or kind.sensitivity_preserving:
            continue
        if kind.stage < noise_stage or (kind.stage == noise_stage and i < mine):
            raise IncompatibleDefenseError(
                f"{spec.name}'s noise is calibrated to {why}, but defenses[{i}] ({other.name}) transforms the message "
                "before the noise is added and can move two neighbouring messages further apart than that (it is "
                f"not non-expansive), so the reported epsilon would not hold: remove {other.name} (clipping and "
                "data-independent noise may stay)")


def build_defenses(scenario: Scenario) -> list[Defense]:
    """Instantiate the scenario's defenses in their composition order (stage, then scenario order)."""
    built = [DEFENSES.get(spec.name).from_spec(spec, scenario) for spec in scenario.defenses]
    return sorted(built, key=lambda d: d.stage)  # sorted() is stable: ties keep scenario order
