"""The contract: what the honest-but-curious server sees, and what only the evaluator sees.

``ClientUpdate`` is everything an update attack is allowed to read: the global model the client started
from, the update it sent (after every client-side defense), the number of examples (Flower's
FedAvg needs it, so every server sees it), and the hyperparameters and side information the
scenario's threat model declares known. ``GroundTruth`` holds the client's real batch, labels and
the randomness of that update (dropout masks, noise); only ``fedsim.metrics`` reads it, and no
module under ``attacks/`` may import it (a test enforces this).

``ReleasedModel`` is what a model-inversion attack reads: the global model released after a round.

Which field each :class:`~fedsim.scenario.Knowledge` flag fills (``fedsim.attacking.observe`` is the
one place that builds a view; ``tests/test_threat_view.py`` scans every field for each flag):

==================  ===========================================================================
always              ``round``, ``partition_id``, ``reference_state`` (a model the server sent), ``staleness``
                    (the lag of the model it sent), ``task``
                    (architecture only: ``TaskInfo.model_transforms`` carries a model-shaping defense's
                    *architectural* parameters, never e.g. DP-SGD's sigma or MID's beta), ``global_state``
                    (BatchNorm running statistics included: the server aggregated them), ``update``, ``num_examples``
``local_hparams``   ``hyperparams`` (lr, steps, batch size, optimizer, ...)
``labels: known``   ``side_info["labels"]`` (refused on a language-modeling task, whose labels are its input text;
                    a grant equal to the inputs makes the outcome oracle: ``fedsim.attacking.input_grants``)
``defense``         ``defenses`` (every defense's name and parameters)
``oracle_masks``    ``side_info["oracle_masks"]`` (ground truth: the runner labels the outcome oracle)
``bn_stats``        nothing: ``running`` lets an attack *use* the global model's running statistics
                    as a prior; ``client`` (the client's batch statistics) has no channel and is refused
==================  ===========================================================================

All are frozen and hold clones, so nothing downstream can alter what was captured. An attack cannot
say whether its output is an oracle: the runner records that from what it handed over
(``fedsim.attacking``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn


def frozen_tensors(tensors: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
    """Detached CPU clones behind a read-only mapping."""
    if tensors is None:
        return None
    return MappingProxyType({k: v.detach().to("cpu").clone() for k, v in tensors.items()})


@dataclass(frozen=True)
class TaskInfo:
    """Public facts about the learning task: the server built the model, so it knows all of this."""

    dataset: str
    input_shape: tuple[int, ...]  # (C, H, W) of an image, (d,) of a tabular feature vector, (T,) of a token sequence
    num_classes: int  # 0 for a regression task (see ``kind``); the vocabulary for language_modeling
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model: Mapping[str, Any]
    protocol: str  # "fedsgd" (update = gradient of one batch) or "fedavg" (update = weight delta)
    # Public descriptions ({"name": ..., **params}) of the defenses whose ``transform_model`` shaped
    # the model (e.g. MID's bottleneck head, inserted dropout), in the order the server applied them:
    # the server built the model, so an attack rebuilding it must apply the same transforms.
    # Only the parameters a transform reads (``Defense.model_params``, e.g. MID's ``bottleneck_dim``), and
    # only transforms that changed the model: the rest of a defense's parameters (DP-SGD's sigma and
    # clipping norm, MID's beta) reach an attack through ``ClientUpdate.defenses`` alone, when
    # ``knowledge.defense`` grants them.
    model_transforms: tuple[Mapping[str, Any], ...] = ()
    # "classification" (labels are class indices), "regression" (real targets, one model output) or
    # "language_modeling" (text: the labels are the token ids themselves, the model predicts token t+1 from 0..t)
    kind: str = "classification"
    # Text tasks: the vocabulary size (token ids are < vocab_size; 0 for images and tables) and the tokenizer's
    # name (fedsim.text.tokenizer.load_tokenizer). Public: the server built the model and ships the tokenizer.
    vocab_size: int = 0
    tokenizer: str = ""

    @property
    def is_text(self) -> bool:
        """Whether inputs are token ids (B, T) (``input_shape`` = (T,)) rather than pixels or features."""
        return self.vocab_size > 0

    @property
    def output_dim(self) -> int:
        """Outputs of the model per example: ``num_classes`` logits, or 1 for a regression."""
        return 1 if self.kind == "regression" else self.num_classes


@dataclass(frozen=True)
class ModelFacts:
    """What the server knows before the first round, to check attack options against the real model.

    ``model`` is the initial global model exactly as the server built it (the scenario's architecture
    after every model-shaping defense, e.g. DP-SGD's BatchNorm -> GroupNorm, MID's bottleneck head);
    ``examples`` maps each partition id to ``min(local.batch_size, partition size)``, the fewest
    examples one of its updates covers. Validation only; never part of an attack's view.
    """

    task: TaskInfo
    model: nn.Module
    examples: Mapping[int, int]


@dataclass(frozen=True)
class ClientUpdate:
    """What the curious server observed from one client in one round."""

    round: int
    partition_id: int
    task: TaskInfo
    global_state: Mapping[str, Tensor]
    update: Mapping[str, Tensor] | None
    num_examples: int  # what the client declared; under DP-SGD its expected count, not the realised batch
    # Keyword-only from here: a field added later can never silently take a positional argument meant
    # for another (a positional ClientUpdate once handed hyperparams to the new reference_state).
    _: KW_ONLY
    # When the protocol makes a client send a gradient DIFFERENCE (DIFF2's difference rounds:
    # mean_i clip(grad l(x_r; z_i) - grad l(x_{r-1}; z_i))), the model its subtracted gradient was taken at
    # (x_{r-1}, the global model the server sent the round before); None when the update is a plain
    # gradient or weight delta. The server sent both models, so every threat model knows it.
    reference_state: Mapping[str, Tensor] | None = None
    # Rounds between the model this client was sent (``global_state``) and the server's current model: 0 for a
    # fresh client, tau for a slow one that trained from w^{t-1-tau} (``federation.staleness``). The server chose
    # which model to send, so every threat model knows it.
    staleness: int = 0
    # Local hyperparameters (lr, steps, batch_size, epochs, ...) only if the threat model grants them.
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    # Side information the threat model grants, e.g. {"labels": Tensor} when labels are "known".
    side_info: Mapping[str, Any] = field(default_factory=dict)
    # Names and public parameters of the defenses in place, only if the threat model grants them.
    defenses: tuple[Mapping[str, Any], ...] = ()
    # The architecture changes a malicious server sent with ``global_state`` in this round (public descriptions,
    # ``ServerModel.architecture``, e.g. ``({"name": "imprint", "bins": 128, ...},)``); () for the agreed model. The
    # server chose them, so every threat model knows them; ``global_state`` then holds the manipulated weights.
    architecture: tuple[Mapping[str, Any], ...] = ()

    @property
    def examples_to_reconstruct(self) -> int:
        """How many examples an attack reconstructs from this view: as many as the labels the threat
        model granted (``knowledge.labels: known`` reveals the batch anyway), else the declared
        ``num_examples``. Under DP-SGD with Poisson sampling that is the client's EXPECTED count
        (``fedsim.defenses.dp_sgd``; fedsgd: the batch size), not the realised batch, which stays private.
        Labels of one row per example (a language model's (B, T) token targets) count their rows."""
        labels = self.side_info.get("labels")
        if labels is not None:
            labels = torch.as_tensor(labels)
            return int(labels.shape[0]) if labels.dim() >= 2 else int(labels.numel())
        return int(self.num_examples)


@dataclass(frozen=True)
class ManipulationView:
    """What a malicious server (``server.role: malicious``) knows when it builds the model it sends in ``round``.

    ``global_state``: the honest global model of this round (read-only CPU tensors), built from ``task`` (the
    agreed architecture, model-shaping defenses included). ``targets``: the partition ids the attack targets this
    round (the server sends them the manipulated model). ``hyperparams``: the clients' local hyperparameters, only
    when ``knowledge.local_hparams`` grants them. ``auxiliary``: surrogate images (B, C, H, W) in pixel space [0, 1]
    from the dataset's held-out test split (no client holds them), with their labels (B,), only when
    ``knowledge.auxiliary_data`` grants them; else None.
    """

    round: int
    task: TaskInfo
    global_state: Mapping[str, Tensor]
    targets: tuple[int, ...]
    _: KW_ONLY
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    auxiliary: Tensor | None = None
    auxiliary_labels: Tensor | None = None


@dataclass(frozen=True)
class ServerModel:
    """The model a malicious server sends instead of the honest global model, through the normal Flower message.

    ``state``: the full state dict the clients load (the agreed parameters, possibly changed, plus those of any
    added module). ``architecture``: the architecture changes the clients must apply to the agreed model before
    loading ``state`` (JSON-able descriptions ``{"name": <registered change>, ...}``,
    :mod:`fedsim.models.manipulation`); () when only weights change (trap weights, fishing). ``to_all``: send it
    to every sampled client (an aggregate attack, e.g. Robbing the Fed through SecAgg) rather than only the
    targeted ones. ``note``: one line for reports ("imprint block, 256 bins, thresholds from auxiliary data").
    """

    state: Mapping[str, Tensor]
    architecture: tuple[Mapping[str, Any], ...] = ()
    to_all: bool = False
    note: str = ""


@dataclass(frozen=True)
class ReleasedModel:
    """The global model as released after ``round``: what anyone who obtains the model sees.

    Model-inversion attacks (``Attack.target == "model"``) read only this: the public task facts and
    read-only CPU tensors of the global state. No client update, no data, no ground truth.
    """

    round: int
    task: TaskInfo
    state: Mapping[str, Tensor]


@dataclass(frozen=True)
class GroundTruth:
    """What the client really used. Evaluator only; never passed to an attack."""

    round: int
    partition_id: int
    inputs: Tensor  # pixel space [0, 1], shape (B, C, H, W); text: token ids, int64 (B, T)
    labels: Tensor  # (B,); language_modeling: the token ids (B, T)
    extras: Mapping[str, Tensor] = field(default_factory=dict)  # dropout masks, update noise, ...


def as_tensor_dict(values: Mapping[str, Any]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v) for k, v in values.items()}


@dataclass(frozen=True)
class Reconstruction:
    """What an attack returns. Images are in pixel space [0, 1] (text: ``tokens`` / ``token_set``); ``failed``
    says why when it gave up.

    Failed versus nothing recovered: ``failed`` (:meth:`failure`) is for an attack that could not run (no update,
    an update or model it cannot read, a refused model, an exception). An attack that RAN and isolated no input
    (Robbing the Fed's bins all mixtures or noise under DP-SGD, no trap neuron firing for a single input, the
    fished class absent from the batch) returns a measured result: an empty ``images`` tensor (0, C, H, W), and
    a plain-words reason in ``stats["nothing_isolated"]`` (e.g. "256 bins, none isolated an input"). The scorer
    then records 0 of B above 40 dB with the blind-guess means, so a defense's effect shows as 0.00, not a blank.

    There is deliberately no ``oracle`` field: whether an outcome used ground truth is decided by the
    runner from what it handed the attack (``fedsim.attacking``), never claimed by the attack.
    """

    images: Tensor | None
    labels: Tensor | None
    stats: Mapping[str, float | str] = field(default_factory=dict)  # e.g. gradient loss, iterations, seconds
    failed: str | None = None
    # Text attacks (``images`` stays None): the recovered sequences as token ids, int64 (K, T), -1 where the attack
    # could not fill a position; and/or the SET of token ids it found used, int64 (M,) sorted distinct (an attack
    # that recovers which tokens were used but not their order, e.g. from the embedding gradient, fills only this).
    tokens: Tensor | None = None
    token_set: Tensor | None = None

    @classmethod
    def failure(cls, reason: str, **stats: float) -> Reconstruction:
        return cls(images=None, labels=None, stats=dict(stats), failed=reason)
