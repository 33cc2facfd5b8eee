"""Refusals for text datasets and the fields that only make sense on them, checked without loading data.

Called by :func:`fedsim.task_checks.check_task`; every refusal is one :class:`~fedsim.errors.ScenarioError` with
the YAML field path:

* ``data.seq_len`` on a dataset that is not text (images and feature vectors have no sequence length);
* ``data.partition.kind: by_source`` on a dataset without sources (only text datasets carry ``groups``);
* ``data.partition.kind`` ``dirichlet`` / ``shards`` on a ``language_modeling`` task: they deal out classes and a
  language model's "labels" are its next tokens (use ``iid`` or ``by_source``);
* ``model.pretrain`` on a dataset without a public part (:func:`fedsim.data.text.has_public_part`).

(``federation.local.augmentation`` on token inputs is refused by :func:`fedsim.task_checks.check_task`.)

What needs the data (a ``data.seq_len`` longer than the dataset's sequences, more ``by_source`` clients than
sources) is refused when the data is loaded (the preflight of ``fedsim validate`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsim.errors import ScenarioError

if TYPE_CHECKING:
    from fedsim.data.catalog import DatasetFacts
    from fedsim.scenario import Scenario


def check_text_data(scenario: Scenario, facts: DatasetFacts) -> None:
    """Raise :class:`ScenarioError` for a text-only field on other data, or what a text task rules out."""
    from fedsim.data.text import has_public_part, no_public_part

    data = scenario.data
    name, kind, text = data.dataset, data.partition.kind, facts.inputs == "tokens"
    if data.seq_len is not None and not text:
        raise ScenarioError("data.seq_len", f"only text datasets have a sequence length, but {name!r} holds "
                                            f"{facts.inputs} inputs (remove data.seq_len)")
    if kind == "by_source" and not text:
        raise ScenarioError("data.partition.kind", f"by_source deals out whole sources (a text dataset's books), "
                                                   f"but {name!r} has none: use iid, dirichlet or shards")
    if text and facts.task == "language_modeling" and kind in ("dirichlet", "shards"):
        raise ScenarioError("data.partition.kind", f"{kind} deals out classes, but {name!r} is a language-modeling "
                                                   "task (no classes): use kind: iid or by_source")
    if scenario.model.pretrain is not None and not has_public_part(name):
        raise ScenarioError("model.pretrain", no_public_part(name))
