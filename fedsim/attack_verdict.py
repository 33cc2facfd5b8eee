"""The runner's verdict on one attack outcome, and the outcome itself (what metrics.json, summary.md and the
report show per attack and update). Split from :mod:`fedsim.attacking` (which re-exports every name here): this
part reads only what the runner handed an attack and what the scorer returned, never runs an attack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.scenario import Knowledge
from fedsim.threat import ClientUpdate


@dataclass
class AttackOutcome:
    """One attack on one captured update: its scores, its stats and (for pictures) the images."""

    attack: str
    attack_index: int
    round: int
    partition_id: int
    metrics: dict[str, Any]
    stats: dict[str, float]
    seconds: float
    failed: str | None = None
    oracle: bool = False  # the runner handed ground truth, or the scorer chose among candidates with it
    oracle_reasons: tuple[str, ...] = ()  # which: "dropout masks", "selection: ..."
    oracle_labels: bool = False  # the runner handed the true labels (knowledge.labels: known)
    staleness: int = 0  # rounds the model the attacked client trained from lagged (federation.staleness; 0: fresh)
    # the SoK letter exercised: the one the attack needed with its params and knowledge (fedsim.threat_models), or,
    # on an update answering a model another attack manipulated, that together with the manipulator's letter
    threat_model: str = ""
    # (index, name) of the malicious attack that built the model this update answers, when not this attack; None
    manipulated_by: tuple[int, str] | None = None
    reconstruction: torch.Tensor | None = field(default=None, repr=False)
    truth: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)  # the attack's labels (MI: target classes)
    # Text attacks (the report shows recovered sentences beside the originals; decode with
    # fedsim.text.tokenizer.decode(task.tokenizer, ids)): ``tokens`` the recovered sequences, int64 (K, T), -1 where
    # unfilled, in the attack's order (metrics["order"][i] is the row matched to true sequence i, -1: none);
    # ``truth_tokens`` the client's true token ids, int64 (B, T); ``token_set`` the recovered distinct ids (M,) of a
    # bag-only attack. ``reconstruction`` and ``truth`` (images) stay None for text.
    tokens: torch.Tensor | None = field(default=None, repr=False)
    truth_tokens: torch.Tensor | None = field(default=None, repr=False)
    token_set: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "attack_index": self.attack_index, "round": self.round,
            "client": self.partition_id, "seconds": round(self.seconds, 3), "failed": self.failed,
            "oracle": self.oracle, "oracle_reasons": list(self.oracle_reasons), "oracle_labels": self.oracle_labels,
            "metrics": self.metrics, "stats": self.stats, "staleness": self.staleness,
            "threat_model": self.threat_model,
            **({} if self.manipulated_by is None else  # absent: the honest model (and in files before it existed)
               {"manipulated_by": {"attack_index": self.manipulated_by[0], "attack": self.manipulated_by[1]}}),
        }


LABEL_METRICS = ("label_acc", "label_acc_matched")


def oracle_grants(knowledge: Knowledge) -> tuple[str, ...]:
    """The ground truth :func:`observe` hands an attack under ``knowledge``, beyond the true labels
    (recorded apart, as ``oracle_labels``): any of it makes the outcome an oracle upper bound."""
    return ("dropout masks",) if knowledge.oracle_masks else ()


def input_grants(view: ClientUpdate, inputs: torch.Tensor) -> tuple[str, ...]:
    """The granted parts of ``view`` (``side_info``, ``hyperparams``, ``defenses``, searched through nested mappings
    and sequences) that hold the client's ground-truth ``inputs`` (images (B, C, H, W), token ids (B, T), ...): a
    tensor equal to them element for element (any shape or dtype), or, for token ids, to their next-token targets
    or contexts (``inputs[:, 1:]``, ``inputs[:, :-1]``). One reason per such grant, e.g. ``side_info["labels"] holds
    the client's inputs``; the runner passes them to :func:`judge` with :func:`oracle_grants`, so the outcome is an
    oracle whatever the attack did with them. The second line of defence behind validation (which refuses
    ``knowledge.labels: known`` on a language model, whose labels are its input text): a task kind added later whose
    grants carry the inputs is labelled, never silently scored as an honest attack."""
    if inputs.numel() == 0:
        return ()
    ref = inputs.detach().to("cpu")
    forms = [ref]
    if not ref.is_floating_point() and ref.dim() == 2 and ref.shape[1] > 1:
        forms += [ref[:, 1:], ref[:, :-1]]
    flat = [f.reshape(-1).double() for f in forms]

    def holds(value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        v = value.detach().to("cpu").reshape(-1)
        return any(v.numel() == f.numel() and torch.equal(v.double(), f) for f in flat)

    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if holds(value):
            found.append(f"{where} holds the client's inputs")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(view.side_info, "side_info")
    walk(view.hyperparams, "hyperparams")
    walk(view.defenses, "defenses")
    return tuple(found)


def judge(metrics: dict[str, Any], grants: Sequence[str] = (), labels_given: bool = False,
          asked: int | None = None) -> tuple[bool, tuple[str, ...], bool, dict[str, Any]]:
    """The runner's verdict on one outcome: ``(oracle, reasons, oracle_labels, metrics)``.

    Whatever the attack returned, the outcome is an oracle when the runner handed it ground truth
    (``grants``, from :func:`oracle_grants`) or when the scorer had to pick among surplus candidates
    with the ground truth (``metrics["oracle_selection"]``) because the attack returned more images than
    the ``asked`` count its view declared. Surplus that comes from the declared count itself (DP-SGD
    declares the expected batch size; the realised Poisson batch was smaller) is the attacker's honest
    estimate: it is still paid for as blind guesses by the scorer, flagged ``count_mismatch``, and not
    labelled oracle. With the labels handed over
    (``labels_given``), label accuracy measures nothing the attack inferred: it is removed from the
    metrics and the outcome says ``oracle_labels``.
    """
    reasons = list(grants)
    returned = max(int(metrics.get("num_reconstructed", 0) or 0),  # images, or labels when more labels came back
                   int(metrics.get("batch_size", 0) or 0) + int(metrics.get("surplus_labels", 0) or 0)
                   if metrics.get("surplus_labels") else 0)
    surplus_by_count = metrics.get("oracle_selection") and asked is not None and returned <= asked
    if surplus_by_count:  # the attack returned the count it was told; the real batch was smaller (DP-SGD)
        metrics = {k: v for k, v in metrics.items() if k != "oracle_selection"}
        metrics["count_mismatch"] = True
    elif metrics.get("oracle_selection"):
        reasons.append(f"selection: the ground truth chose which of {metrics.get('num_reconstructed', '?')} "
                       f"reconstructions (and labels) to score against {metrics.get('batch_size', '?')} examples")
    if labels_given:
        metrics = {k: v for k, v in metrics.items() if k not in LABEL_METRICS}
    return bool(reasons), tuple(reasons), labels_given, metrics
