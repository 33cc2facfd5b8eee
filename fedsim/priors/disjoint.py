"""Refuse a prior that learned from images the scenario's clients hold, compared by data SOURCE.

A GAN prior trained on the clients' own images hands an attack their private data (an unlabelled
oracle). Names are not enough: ``mnist-dcgan`` learned from ``mnist-5k`` train examples 2000..3999,
which are MNIST training images 1770..5847 (some of them), so a scenario on full ``mnist`` holds them
too. Both sides are turned into collection indices (:mod:`fedsim.data.sources`) and compared; where a
mapping is not known the prior is refused, saying why (the unsafe direction is never assumed away).
"""

from __future__ import annotations

from typing import Any

from fedsim.errors import DataUnavailableError
from fedsim.priors.store import read_prior_file, resolve_prior_path


def prior_examples(meta: dict[str, Any]) -> Any:
    """The examples a prior learned from (:class:`fedsim.data.sources.Examples`), from its metadata: the
    training range ``fedsim prior train`` records, or -- for a prior without one -- its dataset, range unknown."""
    from fedsim.data.sources import Examples, examples_of
    from fedsim.scenario import DataSpec

    record = (meta.get("extra") or {}).get("data")
    if isinstance(record, dict) and {"dataset", "split", "start", "stop"} <= set(record):
        spec = DataSpec(dataset=record["dataset"], root=record.get("root"),
                        test_fraction=record.get("test_fraction", 0.2))
        return examples_of(record["dataset"], record["split"], int(record["start"]), int(record["stop"]), spec=spec)
    dataset = str(meta.get("dataset", "?"))
    known = examples_of(dataset, "train", spec=DataSpec(dataset=dataset))
    return Examples(known.collection, None, None, f"{dataset} (range not recorded)",
                    "the prior does not record which examples it learned from")


def check_prior_disjoint(data: Any, name: str) -> None:
    """Raise :class:`~fedsim.errors.DataUnavailableError` (at ``params.prior``) when the prior ``name`` may have
    learned from any example the clients of ``data`` (a :class:`~fedsim.scenario.DataSpec`) hold."""
    from fedsim.data.sources import client_examples, overlap

    meta = read_prior_file(resolve_prior_path(name))["meta"]
    prior, clients = prior_examples(meta), client_examples(data)
    why = overlap(prior, clients)
    if why is None:
        return
    record = (meta.get("extra") or {}).get("data") or {}
    hint = ""
    if record.get("dataset") == data.dataset and record.get("split") == "train":
        hint = f"set data.train_subset to at most {record['start']}, or "
    raise DataUnavailableError(
        f"params.prior: {name!r} was trained on {prior.what}, which may overlap the clients' data ({clients.what}): "
        f"{why}; {hint}use a prior trained on other data")
