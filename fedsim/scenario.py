"""The scenario schema: a YAML file -> validated, frozen pydantic models.

Unknown keys and bad values are rejected with a :class:`ScenarioError` naming the YAML field path
(``attacks[0].budget.iterations``). Plug-in names are resolved against the registries and each
plug-in's ``params`` block is checked against that plug-in's own ``Params`` model, so a typo in an
attack parameter fails at load time, not after the federation has run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedsim.attack_execution_spec import AttackExecution, AttackResources
from fedsim.audit.spec import AuditSpec
from fedsim.errors import FedsimError, ScenarioError
from fedsim.outputs import check_name
from fedsim.server_spec import ServerSpec
from fedsim.spec_base import _PathError, _Strict
from fedsim.staleness_spec import STALE_AGGREGATIONS, StalenessSpec  # noqa: F401  (also public here)
from fedsim.validation_errors import _first_error, format_loc  # noqa: F401  (also public here)
from fedsim.yaml_input import apply_overrides, read_yaml, set_dotted  # noqa: F401  (also public here)
from fedsim.zo.spec import ZerothOrderSpec


def path_component(value: str) -> str:
    """Validate a name that fedsim uses as one path component (the default run directory NAME-TIME, a bench
    directory, a prior file): no path separator, not ``.``/``..``, so it cannot point outside its folder."""
    problem = check_name(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class PartitionSpec(_Strict):
    kind: Literal["iid", "dirichlet", "shards", "by_source"] = Field(
        "iid", description="by_source: each client holds whole sources (a text dataset's books), dealt round-robin")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed)")
    shards_per_client: int = Field(2, ge=1, description="classes per client for 'shards'")


class DataSpec(_Strict):
    dataset: str = "cifar10-mini"
    root: str | None = Field(None, description="folder of torchvision datasets")
    download: bool = False
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held out when the dataset has no test split")
    train_subset: int | None = Field(None, ge=1, description="use only the first N training examples")
    partition: PartitionSpec = PartitionSpec()
    seq_len: int | None = Field(None, ge=2, le=512,
                                description="text datasets only: tokens per example (None: the dataset's default)")


class PretrainSpec(_Strict):
    """Public pretraining before private federated fine-tuning (Li et al., ICLR 2022's setting): the initial global
    model is trained on the text dataset's PUBLIC part (disjoint from every client's data), cached on disk."""

    steps: int = Field(1500, ge=1, description="optimizer steps on the public part")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(32, ge=1)


class ModelSpec(_Strict):
    name: str = "convnet"
    width: int = Field(32, ge=1)
    norm: Literal["none", "batch", "group"] = "none"
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "sigmoid", "gelu", "tanh"] | None = None
    depth: int | None = Field(None, ge=1, le=24, description="text models only: transformer blocks (None: 2)")
    pretrain: PretrainSpec | None = Field(
        None, description="text models only: start the federation from a model pretrained on the dataset's public "
                          "part (fedsim/text/pretrain.py); None: from random weights")


class LocalTraining(_Strict):
    epochs: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="local steps instead of epochs (give epochs or steps, not both)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augmentation: Literal["none", "flip_crop"] = Field(
        "none", description="flip_crop: random crop (+ mirror on mirror-invariant datasets), fedsim/augment.py")

    @model_validator(mode="after")
    def _check_one_of(self) -> LocalTraining:
        """Refuse two fields of which one would silently win (steps over epochs; Adam has no momentum)."""
        # by value, not by fields set: a dumped valid scenario (run folder's scenario.yaml) holds every field
        if self.steps is not None and self.epochs != type(self).model_fields["epochs"].default:
            raise _PathError("steps", f"give epochs or steps, not both (steps would override epochs {self.epochs})")
        if self.optimizer == "adam" and self.momentum > 0:
            raise _PathError("momentum", "is SGD's; optimizer adam would ignore it (set 0, or use optimizer: sgd)")
        return self


class FederationSpec(_Strict):
    clients: int = Field(10, ge=1)
    rounds: int = Field(3, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client, every round")
    protocol: Literal["fedsgd", "fedavg", "zeroth_order"] = "fedsgd"  # zeroth_order: the zeroth_order block
    local: LocalTraining = LocalTraining()
    server_lr: float | None = Field(None, gt=0, description="fedsgd step size on the server (default local.lr)")
    staleness: StalenessSpec | None = Field(None, description="slow clients training from old global models")

    @model_validator(mode="after")
    def _check_sampling(self) -> FederationSpec:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) > clients ({self.clients})")
        if self.local.augmentation != "none" and self.protocol == "zeroth_order":  # would be silently ignored
            raise _PathError("local.augmentation", "zeroth-order clients query the loss on their own data; "
                                                   "they do not augment it (use augmentation: none)")
        if self.server_lr is not None and self.protocol == "fedavg":  # would be silently ignored
            raise _PathError("server_lr", "is FedSGD's server step size; fedavg averages the clients' models and "
                                          "has none: remove it")
        stale = self.staleness
        if stale is not None:
            if self.protocol != "fedavg":
                raise _PathError("staleness", f"stale updates are weight deltas: needs protocol fedavg, "
                                              f"not {self.protocol}")
            for c in stale.slow_clients or []:
                if not 0 <= c < self.clients:
                    raise _PathError("staleness.slow_clients", f"client {c} is outside 0..{self.clients - 1}")
            if stale.num_slow > self.clients:
                raise _PathError("staleness.num_slow", f"{stale.num_slow} > clients ({self.clients})")
            if stale.tau >= self.rounds and stale.aggregation != "no_staleness":
                raise _PathError("staleness.tau", f"{stale.tau} >= federation.rounds ({self.rounds}): a slow client "
                                 "trains from the current model until round tau + 1, so no client is ever stale")
        return self

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.clients


class ClientResources(_Strict):
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class BackendSpec(_Strict):
    kind: Literal["ray", "inprocess"] = "ray"
    client_resources: ClientResources = ClientResources()
    init_args: dict[str, Any] = Field(default_factory=dict, description="forwarded to ray.init")
    address: str | None = Field(None, description="existing Ray cluster, e.g. 'auto' or 'ray://host:10001'")


class PluginSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class DefenseSpec(PluginSpec):
    pass


class Knowledge(_Strict):
    """What the attacker is assumed to know, beyond the global model and the update."""

    labels: Literal["infer", "known"] = "infer"
    bn_stats: Literal["none", "running", "client"] = "none"
    local_hparams: bool = False
    defense: bool = False
    # Ground-truth dropout masks for ORACLE upper bounds only (the DIA paper's WIIG): never a
    # realistic threat model; outputs of attacks that use it are labelled oracle.
    oracle_masks: bool = False
    # Surrogate data (the SoK's capability of threat models D, E, G, H): images from the task's distribution that no
    # client holds. fedsim hands the server the dataset's held-out TEST split (or a GAN prior trained on disjoint
    # data); an attack that needs it is refused unless this is true (fedsim.threat_models).
    auxiliary_data: bool = False


class Budget(_Strict):
    iterations: int = Field(4000, ge=0)
    restarts: int = Field(1, ge=1)
    time_limit_s: float | None = Field(None, gt=0)


class AttackSpec(PluginSpec):
    rounds: list[int] = Field(default_factory=lambda: [1], description="rounds (1-based) to attack")
    every: int | None = Field(None, ge=1, description="attack every k-th round (give rounds or every, not both)")
    clients: list[int] | Literal["all"] = Field(default_factory=lambda: [0], description="partition ids")
    knowledge: Knowledge = Knowledge()
    budget: Budget = Budget()
    resources: AttackResources = Field(AttackResources(), description="per Ray task of this attack "
                                       "(attack_execution.mode: ray; fedsim.attack_execution_spec)")

    def target_rounds(self, num_rounds: int) -> list[int]:
        if self.every is not None:
            return list(range(1, num_rounds + 1, self.every))
        return sorted(set(self.rounds))

    def target_clients(self, num_clients: int) -> list[int]:
        return list(range(num_clients)) if self.clients == "all" else sorted(set(self.clients))


class OutputSpec(_Strict):
    dir: str = "runs"
    save_images: bool = True


class EvaluationSpec(_Strict):
    every: int = Field(1, ge=1, description="evaluate the global model every k rounds")
    batch_size: int = Field(256, ge=1)
    class_accuracy: list[int] = Field(default_factory=list, description="classes whose test accuracy each "
                                      "evaluation also reports, as test_accuracy_class<k> (e.g. a slow class)")


class Scenario(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    federation: FederationSpec = FederationSpec()
    backend: BackendSpec = BackendSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    server: ServerSpec = ServerSpec()
    defenses: list[DefenseSpec] = Field(default_factory=list)
    attacks: list[AttackSpec] = Field(default_factory=list)
    attack_execution: AttackExecution = Field(AttackExecution(), description="serial (default) or one Ray task "
                                              "per attack job (fedsim.attack_execution_spec)")
    output: OutputSpec = OutputSpec()
    zeroth_order: ZerothOrderSpec | None = Field(None, description="black-box task and method (fedsim.zo)")
    audit: AuditSpec | None = Field(None, description="one-run empirical privacy audit (fedsim.audit)")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return path_component(value)

    @model_validator(mode="after")
    def _check_targets(self) -> Scenario:
        fed = self.federation
        for i, atk in enumerate(self.attacks):
            if atk.every is not None and atk.rounds != [1]:  # by value: a dumped valid scenario holds both fields
                raise _PathError(f"attacks[{i}].every", "give rounds or every, not both (every would override "
                                 f"rounds {atk.rounds})")
            if atk.every is None and not atk.rounds:
                raise _PathError(f"attacks[{i}].rounds", "an empty list attacks no round (give rounds or every)")
            for r in atk.rounds:
                if not 1 <= r <= fed.rounds:
                    raise _PathError(f"attacks[{i}].rounds", f"round {r} is outside 1..{fed.rounds}")
            if atk.clients != "all":
                for c in atk.clients:
                    if not 0 <= c < fed.clients:
                        raise _PathError(f"attacks[{i}].clients", f"client {c} is outside 0..{fed.clients - 1}")
        return self


def parse_scenario(raw: Any) -> Scenario:
    """Validate a raw mapping (already parsed YAML), resolve plug-in names and params, and check that the
    scenario can run on its data (:func:`fedsim.preflight.check_runnable`: what validates must run)."""
    if not isinstance(raw, dict):
        raise ScenarioError("", "a scenario must be a YAML mapping")
    grid_keys = [k for k in ("base", "sweep", "exclude", "repeats", "design") if k in raw]
    if grid_keys:  # a scenario has none of these top-level keys; fedsim.bench.grid.Grid has them all
        raise ScenarioError("", f"this is a bench grid (top-level {', '.join(grid_keys)}), not a scenario: run it "
                                "with `fedsim bench GRID.yaml` (`--dry-run` checks every cell and runs nothing)")
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None
    from fedsim.attack_execution_spec import check_attack_execution

    check_attack_execution(scenario)  # ray mode where it cannot run, resources Ray could never schedule
    from fedsim.audit.checks import check_audit

    if scenario.federation.protocol == "zeroth_order" or scenario.zeroth_order is not None:
        check_audit(scenario)  # an audit: block is refused here (no update for a canary to enter)
        from fedsim.zo.validate import check_zeroth_order  # its own rules; the checks below are for NN protocols
        return check_zeroth_order(scenario)
    resolve_plugins(scenario)
    from fedsim.simulation.staleness import check_staleness

    check_staleness(scenario)  # defenses that change the server's aggregation (the class is checked with the data)
    check_audit(scenario)  # what the audit's canaries cannot run in (staleness, a malicious server, the wrong level)
    from fedsim.task_checks import check_task

    check_task(scenario)  # what the task kind rules out (a class partition of a regression, ...), no data needed
    from fedsim.resources import check_scenario_resources

    check_scenario_resources(scenario)  # CPUs/GPUs/device this machine can give (no data needed)
    from fedsim.metrics.evaluator import check_evaluator_disjoint

    check_evaluator_disjoint(scenario)  # a model-inversion judge never learned from the clients' images
    from fedsim.preflight import check_runnable

    check_runnable(scenario)
    from fedsim.attack_checks import check_attack_preconditions

    check_attack_preconditions(scenario)  # attack options against the model as built
    return scenario


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario file."""
    raw = read_yaml(path)
    return parse_scenario(apply_overrides(raw if raw is not None else {}, list(overrides or [])))


def plugin_error(where: str, spec: PluginSpec, err: FedsimError) -> ScenarioError:
    """``err`` from a plug-in's check of ``spec`` (at ``where``, e.g. ``attacks[0]``) as a ScenarioError: a path
    that starts with a field of the spec (``knowledge.bn_stats``, ``params.label_strategy``) is taken
    relative to it; a path that starts with another top-level scenario field (``model.name``,
    ``federation.protocol``, ``federation.local.optimizer``) is the field to edit and is kept as it is; any other
    error is reported at ``where`` with its whole message. A plain error whose message starts with such a path
    (``params.grad_sample_mode: bk cannot ...``) is read the same way, so the path is never printed as
    ``defenses[0]: params.x``."""
    if not isinstance(err, ScenarioError):
        path, sep, reason = str(err).partition(": ")
        if sep and " " not in path and path:
            err = ScenarioError(path, reason)
    if isinstance(err, ScenarioError):
        head = err.path.split(".")[0].split("[")[0]
        if head in type(spec).model_fields:
            return ScenarioError(f"{where}.{err.path}", err.reason)
        if head in Scenario.model_fields:
            return ScenarioError(err.path, err.reason)
    return ScenarioError(where, str(err))


def attack_error(index: int, err: FedsimError) -> ScenarioError:
    """:func:`plugin_error` for ``attacks[index]`` (an :class:`AttackSpec`)."""
    return plugin_error(f"attacks[{index}]", AttackSpec(name="?"), err)


def resolve_plugins(scenario: Scenario) -> None:
    """Check dataset, model, defense and attack names and each plug-in's params block."""
    from fedsim.data import DATASETS
    from fedsim.models import MODELS
    from fedsim.plugins import attack_registry, defense_registry
    from fedsim.task_checks import check_input_kind

    if scenario.data.dataset not in DATASETS:
        known = ", ".join(DATASETS)
        raise ScenarioError("data.dataset", f"unknown dataset {scenario.data.dataset!r} (known: {known})")
    if scenario.model.name not in MODELS:
        raise ScenarioError("model.name", f"unknown model {scenario.model.name!r} (known: {', '.join(MODELS)})")
    for group, specs, registry in (
        ("defenses", scenario.defenses, defense_registry()),
        ("attacks", scenario.attacks, attack_registry()),
    ):
        for i, spec in enumerate(specs):
            if spec.name not in registry:
                known = ", ".join(registry)
                raise ScenarioError(f"{group}[{i}].name", f"unknown {group[:-1]} {spec.name!r} (known: {known})")
            plugin = registry.get(spec.name)
            try:
                plugin.Params.model_validate(spec.params)
            except ValidationError as err:
                inner = _first_error(err)
                where = f"{group}[{i}].params" + (f".{inner.path}" if inner.path else "")
                raise ScenarioError(where, inner.reason) from None
            least = getattr(plugin, "min_iterations", 0)  # attacks: 1 for every optimizing one
            if isinstance(spec, AttackSpec) and spec.budget.iterations < least:
                raise ScenarioError(f"{group}[{i}].budget.iterations",
                                    f"{spec.budget.iterations}: {spec.name} optimizes, so it needs at least "
                                    f"{least} (0 iterations could only end in a failed outcome)")
            check_input_kind(scenario, group, i, plugin)  # "cannot work on this kind of data" comes first
            check = getattr(plugin, "check_scenario", None)
            if check is not None:
                try:
                    check(scenario, spec)
                except FedsimError as err:
                    raise plugin_error(f"{group}[{i}]", spec, err) from None
            if isinstance(spec, AttackSpec):  # after the plug-in's own checks: "cannot work here" comes first
                check_threat_model(scenario, i, spec, plugin)
    from fedsim.malicious_rules import check_scenario as check_manipulations

    check_manipulations(scenario)  # a malicious server sends one manipulated model per round


def check_threat_model(scenario: Scenario, index: int, spec: AttackSpec, plugin: Any) -> None:
    """Refuse attack ``index`` when the scenario does not grant the SoK threat model it needs
    (``plugin.threat_model_for(params, knowledge)``, :mod:`fedsim.threat_models`), at the field that would grant it."""
    from fedsim.threat_models import refusal

    letter = plugin.threat_model_for(plugin.Params.model_validate(spec.params), spec.knowledge)
    problem = refusal(scenario, index, spec, letter)
    if problem is not None:
        raise ScenarioError(*problem)
