"""Refusals that follow from the kind of task, checked without the data (which may not be on disk yet).

A dataset declares its task and inputs (:func:`fedsim.data.facts_of`): image classification by default,
``regression`` on ``tabular`` feature vectors for ``diabetes`` and ``california-housing``. On a regression
task fedsim refuses, with the YAML field path:

* ``data.partition.kind`` ``dirichlet`` / ``shards``: they deal out classes, and a regression has none;
* every attack (``attacks[i]``): the update attacks reconstruct images and class labels (and score them
  with PSNR/SSIM/LPIPS and label accuracy), the model-inversion attacks synthesize a class's images; none
  of them has a regression form in fedsim.

On tabular inputs of any task, a model that cannot take a feature vector (the image models ``convnet``,
``lenet``, ``resnet*``, ``vit``) is refused at ``model.name``; ``fc10`` and ``mlp`` take both. On any input that
is not an image (feature vectors, token sequences), ``federation.local.augmentation`` other than ``none`` is
refused (it flips and crops images). On token sequences, a text model whose declared task
(``fedsim.models.TEXT_MODELS``) is not the dataset's is refused at ``model.name`` (:func:`check_text_model_task`:
``bert`` on ``kjv``, ``gpt`` on ``kjv-genre``), staleness's ``gi_conversion`` (gradient inversion into
images) is refused, and on a language-modeling task (labels = next tokens, no classes) ``slow_class`` and
``evaluation.class_accuracy`` are, and so is ``attacks[i].knowledge.labels: known`` (the labels of a language model are
its input token ids: granting them would hand the attack the client's text).

Every plug-in declares the input kinds it works on (``Attack.inputs``: images by default, ``("tokens",)`` for
the text attacks; ``Defense.inputs``: all kinds by default, Soteria not tokens): :func:`check_input_kind` refuses
one at ``attacks[i]`` / ``defenses[i]`` when the dataset's kind (:func:`fedsim.data.facts_of`) is not among them.
"""

from __future__ import annotations

from typing import Any

from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario


def check_task(scenario: Scenario) -> None:
    """Raise :class:`ScenarioError` (field path) for what the scenario's task kind rules out."""
    from fedsim.data import facts_of

    name = scenario.data.dataset
    facts = facts_of(name)
    from fedsim.data.text_checks import check_text_data

    check_text_data(scenario, facts)  # data.seq_len, by_source, class partitions of an LM, model.pretrain
    if facts.task == "regression":
        kind = scenario.data.partition.kind
        if kind != "iid":
            raise ScenarioError("data.partition.kind", f"{kind} deals out classes, but {name!r} is a regression "
                                                       "task (no classes): use kind: iid")
        if scenario.attacks:
            attack = scenario.attacks[0].name
            raise ScenarioError("attacks[0]", f"{attack} reconstructs images and class labels, but {name!r} is a "
                                              "regression task on feature vectors: fedsim has no attack on "
                                              "regression tasks (remove attacks)")
    augmentation = scenario.federation.local.augmentation
    if facts.inputs != "image" and augmentation != "none":
        raise ScenarioError("federation.local.augmentation", f"{augmentation} flips and crops images, but "
                            f"{name!r} holds {_HOLDS[facts.inputs]} (use augmentation: none)")
    if facts.inputs == "tabular":
        _check_vector_model(scenario, facts.features)
    if facts.inputs == "tokens":
        check_text_model_task(scenario, facts.task)
        _check_text(scenario, facts.task)


#: A text model's declared task (``fedsim.models.TEXT_MODELS``) in words.
_MODEL_IS = {"language_modeling": "a language model", "classification": "a classifier"}
_TASK_IS = {"language_modeling": "a language-modeling task", "classification": "a classification task"}


def check_text_model_task(scenario: Scenario, task: str) -> None:
    """Refuse, at ``model.name``, a text model whose declared task (``fedsim.models.TEXT_MODELS``) is not the
    token dataset's ``task`` (e.g. ``bert``, a classifier, on the language-modeling ``kjv``; ``gpt`` on
    ``kjv-genre``): one line naming the models and the text datasets that fit. Any other model on tokens is
    refused by :func:`fedsim.models.build_model` (not a text model)."""
    from fedsim.data.catalog import FACTS
    from fedsim.models import TEXT_MODELS

    model, name = scenario.model.name, scenario.data.dataset
    declared = TEXT_MODELS.get(model)
    if declared is None or declared == task:
        return
    models = sorted(m for m, t in TEXT_MODELS.items() if t == task)
    datasets = sorted(d for d, f in FACTS.items() if f.inputs == "tokens" and f.task == declared)
    use = " or ".join(x for x in (", ".join(models), ", ".join(datasets)) if x)
    raise ScenarioError("model.name", f"{model} is {_MODEL_IS.get(declared, declared)}; {name!r} is "
                                      f"{_TASK_IS.get(task, task)} (use {use})")


def _check_text(scenario: Scenario, task: str) -> None:
    """What a token dataset rules out (module doc): gradient inversion into images, and an LM task's classes and
    label grants (its labels are the inputs)."""
    name = scenario.data.dataset
    stale = scenario.federation.staleness
    if stale is not None and stale.aggregation == "gi_conversion":
        raise ScenarioError("federation.staleness.aggregation", f"gi_conversion turns stale updates into images by "
                            f"gradient inversion, but {name!r} holds token sequences (use direct, downweight or "
                            "dc_asgd)")
    if task != "language_modeling":
        return
    for i, spec in enumerate(scenario.attacks):
        if spec.knowledge.labels == "known":  # the labels of a language model ARE its input text (GroundTruth.labels)
            raise ScenarioError(f"attacks[{i}].knowledge.labels", f"known would hand {spec.name} the client's text: "
                                f"the labels of a language model ({name!r}) are its input token ids (use infer)")
    no_classes = f"{name!r} is a language-modeling task: its labels are the next tokens, not classes"
    if stale is not None and stale.slow_class is not None:
        raise ScenarioError("federation.staleness.slow_class", f"{no_classes} (name the slow clients with "
                                                               "slow_clients)")
    if scenario.evaluation.class_accuracy:
        raise ScenarioError("evaluation.class_accuracy", f"{no_classes} (remove class_accuracy)")


#: What a dataset of each input kind holds, and what a plug-in of that kind works on, in words.
_HOLDS = {"image": "images", "tabular": "feature vectors", "tokens": "token sequences"}
#: The input kind as an adjective ("image attacks", "text attacks").
_KIND_WORD = {"image": "image", "tabular": "tabular", "tokens": "text"}


def check_input_kind(scenario: Scenario, group: str, index: int, plugin: Any) -> None:
    """Refuse ``plugin`` (the class of ``scenario.<group>[index]``, group ``attacks`` or ``defenses``) when the
    dataset's input kind is not among its declared ``inputs`` (module doc): one line at ``<group>[index]`` that
    names what it works on, what the dataset holds, and the registered plug-ins that work on that kind."""
    from fedsim.data import facts_of
    from fedsim.plugins import attack_registry, defense_registry

    name = scenario.data.dataset
    kind = facts_of(name).inputs
    accepted = tuple(getattr(plugin, "inputs", ()))
    if kind in accepted:
        return
    spec = getattr(scenario, group)[index]
    registry = attack_registry() if group == "attacks" else defense_registry()
    others = sorted(n for n in registry if kind in getattr(registry.get(n), "inputs", ()))
    works = " and ".join(_HOLDS.get(k, k) for k in accepted) or "no input kind"
    verb = "reconstructs" if group == "attacks" else "works on"
    why = getattr(plugin, "inputs_reason", "")
    holds = _HOLDS.get(kind, kind) + (" of a regression task" if facts_of(name).task == "regression" else "")
    if group == "defenses":
        alternatives = "remove it"
    elif others:
        alternatives = f"{_KIND_WORD.get(kind, kind)} attacks: {', '.join(others)}"
    else:
        alternatives = f"no attack in fedsim reconstructs {_HOLDS.get(kind, kind)}: remove it"
    raise ScenarioError(f"{group}[{index}]", f"{spec.name} {verb} {works}{f' ({why})' if why else ''}, but {name!r} "
                                             f"holds {holds} ({alternatives})")


def _check_vector_model(scenario: Scenario, features: int | None) -> None:
    """The model must build on (features,) inputs (a dry build, no data; the global RNG is left as it was)."""
    from fedsim.models import build_model

    shape = (features or 1,)
    try:
        build_model(scenario.model, shape, 1, seed=0)
    except ScenarioError as err:
        if err.path != "model.name":
            raise
        raise ScenarioError("model.name", f"{err.reason}; dataset {scenario.data.dataset!r} holds "
                                          "feature vectors") from None
