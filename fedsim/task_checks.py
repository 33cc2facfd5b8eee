"""Refusals that follow from the kind of task, checked without the data (which may not be on disk yet).

A dataset declares its task and inputs (:func:`fedsim.data.facts_of`): image classification by default,
``regression`` on ``tabular`` feature vectors for ``diabetes`` and ``california-housing``. On a regression
task fedsim refuses, with the YAML field path:

* ``data.partition.kind`` ``dirichlet`` / ``shards``: they deal out classes, and a regression has none;
* every attack (``attacks[i]``): the update attacks reconstruct images and class labels (and score them
  with PSNR/SSIM/LPIPS and label accuracy), the model-inversion attacks synthesize a class's images; none
  of them has a regression form in fedsim.

On tabular inputs of any task, ``federation.local.augmentation`` other than ``none`` is refused (it flips and
crops images), and a model that cannot take a feature vector (the image models ``convnet``,
``lenet``, ``resnet*``, ``vit``) is refused at ``model.name``; ``fc10`` and ``mlp`` take both.
"""

from __future__ import annotations

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
    if facts.inputs == "tabular":
        augmentation = scenario.federation.local.augmentation
        if augmentation != "none":
            raise ScenarioError("federation.local.augmentation", f"{augmentation} flips and crops images, but "
                                f"{name!r} holds feature vectors (use augmentation: none)")
        _check_vector_model(scenario, facts.features)


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
