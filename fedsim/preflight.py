"""Validation that needs the data: what ``fedsim validate`` accepts must run.

:func:`fedsim.scenario.parse_scenario` calls :func:`check_runnable` after the schema and plug-in
checks. It builds what every client builds (dataset, partitions, the model after the model-stage
defenses) and refuses, with the YAML field path, what would otherwise fail only once the federation
runs:

* data that does not fit the scenario (``data.train_subset`` beyond the dataset, more clients than
  examples, shards that cannot be dealt): the loaders' and partitioners' own errors, raised here;
* a model (after ``transform_model``) that cannot run on the dataset's inputs: ``model.name``, or
  ``defenses[i]`` when a defense's ``transform_model`` refuses it;
* a model that cannot take a training step on one example (BatchNorm, or GroupNorm with one value
  per group, normalizes over the batch; :func:`fedsim.training.min_train_batch`) where some client's
  batch would hold one: ``federation.local.batch_size: 1``, or a client whose partition has a single
  example (``federation.clients`` for iid splits, ``data.partition`` otherwise). A FedAvg epoch whose
  last batch would hold one example is not refused: training gives that example to the batch
  before it (:func:`fedsim.training.batch_schedule`);
* each defense's ``check_model(model, input_shape)``, e.g. DP-SGD's per-sample gradient modes.

Data that is not on disk is never downloaded here: the checks that need it are skipped, and
:func:`skipped_note` says so. ``fedsim validate`` then refuses the scenario with the run's own one line (exit 2)
when ``data.download`` is false, as the run would; with ``download: true`` it prints the note (the run fetches
the data, or stops on it with one line before anything starts).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.errors import DataUnavailableError, FedsimError, ScenarioError
from fedsim.models.base import zero_inputs
from fedsim.scenario import DefenseSpec, Scenario, plugin_error

_SKIPPED: dict[str, str] = {}  # scenario JSON -> why the data checks were skipped (at most a few entries)


def check_runnable(scenario: Scenario) -> None:
    """Refuse (:class:`ScenarioError` with the field path) a scenario that validates but could not run."""
    from fedsim.simulation.setup import FederationSetup, setup_for

    key = scenario.model_dump_json()
    _SKIPPED.pop(key, None)
    if scenario.data.download:  # never download while validating: look at what is on disk
        setup = FederationSetup(scenario.model_copy(update={"data": scenario.data.model_copy(
            update={"download": False})}))
    else:
        setup = setup_for(scenario)  # the run reuses this process's setup (data, partitions)
    try:
        data = setup.data
    except DataUnavailableError as err:
        if len(_SKIPPED) > 16:
            _SKIPPED.clear()
        _SKIPPED[key] = str(err)
        return
    from fedsim.simulation.staleness import check_staleness

    check_staleness(scenario, data.num_classes if data.task == "classification" else 0)
    for k in scenario.evaluation.class_accuracy:  # each needs test examples of a class the task has
        if data.task != "classification" or not int((data.test_y == k).sum()):
            raise ScenarioError("evaluation.class_accuracy", f"class {k} has no test examples in "
                                                             f"{scenario.data.dataset!r}")
    sizes = [len(p) for p in setup.partitions]
    model = _transformed_model(scenario, setup)
    shape = tuple(int(d) for d in data.input_shape)
    _check_forward(scenario, model, shape)
    from fedsim.training import min_train_batch

    if min_train_batch(model, shape) > 1:
        _check_no_single_example_batch(scenario, sizes)
    for index, defense in _defenses_with_index(scenario, setup):
        try:
            defense.check_model(model, shape)
        except FedsimError as err:
            raise _at(f"defenses[{index}]", err) from None


def skipped_note(scenario: Scenario) -> str | None:
    """Why :func:`check_runnable` skipped the checks that need the data (it is not on disk), or None."""
    return _SKIPPED.get(scenario.model_dump_json())


def _defenses_with_index(scenario: Scenario, setup) -> list[tuple[int, object]]:  # noqa: ANN001
    """``setup.defenses`` (composition order: stage, then scenario order) with each one's index in
    ``scenario.defenses``, for error paths (the same stable sort as ``build_defenses``)."""
    by_spec = sorted(range(len(scenario.defenses)), key=lambda i: _stage_of(scenario.defenses[i].name))
    return list(zip(by_spec, setup.defenses, strict=True))


def _stage_of(name: str) -> int:
    from fedsim.plugins import defense_registry

    return int(defense_registry().get(name).stage)


def _transformed_model(scenario: Scenario, setup) -> nn.Module:  # noqa: ANN001
    """The initial global model, built as :meth:`FederationSetup.build_model` builds it, with a
    refusing ``transform_model`` reported at its defense's path."""
    from fedsim.models import build_model
    from fedsim.seeding import derive_seed

    model = build_model(scenario.model, setup.data.input_shape, setup.data.output_dim,
                        seed=derive_seed(scenario.seed, "model-init"), vocab_size=setup.data.vocab_size)
    for index, defense in _defenses_with_index(scenario, setup):
        try:
            model = defense.transform_model(model)
        except FedsimError as err:
            raise _at(f"defenses[{index}]", err) from None
    return model


def _check_forward(scenario: Scenario, model: nn.Module, shape: tuple[int, ...]) -> None:
    """A train-mode forward pass on two zero examples must work (the RNG is left as it was)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()(zero_inputs(model, shape))
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ScenarioError("model.name", f"{scenario.model.name} cannot run on the "
                                          f"{'x'.join(map(str, shape))} inputs of {scenario.data.dataset!r}: "
                                          f"{first}") from None


def _check_no_single_example_batch(scenario: Scenario, sizes: list[int]) -> None:
    """The model cannot train on one example: refuse a schedule that must give some client such a batch."""
    why = (f"{scenario.model.name}" + (" with model.norm: batch" if scenario.model.norm == "batch" else "")
           + " cannot take a training step on a single example (a normalization layer normalizes over the batch)")
    fix = "model.norm: group" if scenario.model.norm == "batch" else "another model"
    if scenario.federation.local.batch_size == 1:
        raise ScenarioError("federation.local.batch_size", f"1, but {why}: use a batch size of at least 2 or {fix}")
    lone = [k for k, n in enumerate(sizes) if n == 1]
    if lone:
        part = scenario.data.partition
        path = "federation.clients" if part.kind == "iid" else "data.partition"
        raise ScenarioError(path, f"client {lone[0]} holds 1 example ({len(lone)} client(s) do, {part.kind} split), "
                                  f"but {why}: use fewer clients, more data (data.train_subset) or {fix}")


def _at(path: str, err: FedsimError) -> ScenarioError:
    """``err`` (a defense's refusal) as a one-line ScenarioError at ``path`` (``defenses[i]``): a path of the
    defense's own fields (``params.grad_sample_mode``) joins it (``defenses[0].params.grad_sample_mode``), as
    :func:`fedsim.scenario.plugin_error` does for the scenario-time checks."""
    if isinstance(err, ScenarioError):
        err = ScenarioError(err.path, err.reason.splitlines()[0] if err.reason else "")
    else:
        err = FedsimError(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return plugin_error(path, DefenseSpec(name="?"), err)
