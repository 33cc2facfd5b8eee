"""Attack options checked against the model the server actually builds, before anything runs.

Some attack options hold only for some models: iDLG's label rule needs a non-negative input to the
final linear layer, GradInversion's BatchNorm prior needs BatchNorm layers. The model's name does
not say (MID's bottleneck feeds a ReLU network's classifier a Gaussian sample; DP-SGD replaces
BatchNorm by GroupNorm), so each attack's :meth:`fedsim.attacks.base.Attack.check_model` reads the built
model itself, in a :class:`~fedsim.threat.ModelFacts`.

:func:`check_attack_preconditions` runs at validation (``fedsim.scenario.parse_scenario``) and again
when a run starts (``fedsim.run.run_scenario``), where the data is on disk for certain: validation
never downloads, so it skips these checks for data that is not there yet.
"""

from __future__ import annotations

from fedsim.errors import DataUnavailableError, FedsimError
from fedsim.scenario import Scenario, attack_error
from fedsim.threat import ModelFacts


def model_facts(scenario: Scenario) -> ModelFacts | None:
    """The server's initial global model and task facts for ``scenario`` (``None`` when its data is not
    on disk; never downloads). Errors of the data or of a defense's ``transform_model`` propagate."""
    from fedsim.simulation.setup import FederationSetup, setup_for

    if scenario.data.download:  # look at what is on disk, never download while checking
        setup = FederationSetup(scenario.model_copy(update={"data": scenario.data.model_copy(
            update={"download": False})}))
    else:
        setup = setup_for(scenario)  # cached: the run reuses its data and partitions
    try:
        setup.data  # noqa: B018 - load it (or learn that it is not there)
    except DataUnavailableError:
        return None
    batch = scenario.federation.local.batch_size
    examples = {pid: min(batch, len(part)) for pid, part in enumerate(setup.partitions)}
    return ModelFacts(task=setup.task, model=setup.build_model(), examples=examples)


def check_attack_preconditions(scenario: Scenario) -> None:
    """Refuse, with the YAML field path (``attacks[i].params.label_strategy``, ...), an attack option whose
    precondition the scenario's built model does not meet (each attack's ``check_model``)."""
    if not scenario.attacks:
        return
    from fedsim.plugins import attack_registry

    facts = model_facts(scenario)
    if facts is None:
        return
    registry = attack_registry()
    for index, spec in enumerate(scenario.attacks):
        check = getattr(registry.get(spec.name), "check_model", None)
        if check is None:
            continue
        try:
            check(scenario, spec, facts)
        except FedsimError as err:
            raise attack_error(index, err) from None

