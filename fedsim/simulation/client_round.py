"""One client's round, the single pipeline behind every client path.

Both the Message-API ClientApp (:mod:`fedsim.simulation.client_app`) and the SecAgg+ NumPyClient
(:mod:`fedsim.simulation.secure_client`) call :func:`run_client_round`, so a defense hook cannot be
applied on one path and forgotten on the other. In order:

1. build the model (model-transforming defenses included; or reuse this process's client module when no
   defense transforms, wraps or inspects it: :meth:`FederationSetup.client_model`), apply the architecture
   changes a malicious server shipped with it (``keys.ARCHITECTURE``, :mod:`fedsim.models.manipulation`), load
   the server's weights, and run every defense's ``inspect_model`` on it before any training (its metrics go in
   the reply; a ``ModelRefusedError`` becomes the error reply, i.e. the client's failure with that reason);
2. a :class:`TrainingJob` with the client's persistent state, passed through every defense's
   ``wrap_training`` (DP-SGD, MID, Soteria, ...);
3. :func:`local_update` on the client's partition;
4. every update-stage defense's ``transform_update`` (clipping, noise, pruning, quantization, ...) on
   the quantity sent: the gradient under fedsgd, the weight delta under fedavg (the client then sends
   global + transformed delta);
5. the reply: what is sent, ``num-examples``, and the metrics every client reports (``partition-id``,
   ``train-loss``, each defense's metrics under ``fedsim.<name>``, e.g. ``fedsim.epsilon``), plus, when
   asked, the ground-truth record (real batch and the defenses' recorded randomness) for the evaluator.

Per-client state (e.g. DP-SGD's accountant history, a model the client must remember) lives in Flower's
``Context.state``: string values in one ``ConfigRecord``, tensor values in one ``ArrayRecord``
(:func:`load_state` / :func:`save_state`); both paths hand the node's persistent Context to this pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor, nn

from fedsim.augment import augmentation_for
from fedsim.defenses.base import Defense, UpdateContext
from fedsim.models.manipulation import apply_architecture
from fedsim.scenario import Scenario
from fedsim.simulation import keys
from fedsim.simulation.setup import FederationSetup, setup_for
from fedsim.training import LocalResult, TrainingJob, local_update, task_loss

Metric = float | int


@dataclass
class ClientReply:
    """What one client produced in one round.

    ``sent``: fedsgd: the gradient per parameter name; fedavg: the new ``state_dict`` (CPU tensors),
    after the update-stage defenses. ``metrics``: the reply's metric record (``num-examples``,
    ``partition-id``, ``train-loss``, ``fedsim.*``). ``truth``: ``inputs``, ``labels`` and
    ``extra/*`` tensors for the evaluator, only when the round was asked to record them.
    """

    sent: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, Metric]
    truth: dict[str, Tensor] | None = None


def update_defenses(defenses: Sequence[Defense]) -> list[Defense]:
    """The defenses that transform the update a client sends (their class overrides ``transform_update``)."""
    return [d for d in defenses if type(d).transform_update is not Defense.transform_update]


def build_job(setup: FederationSetup, model: nn.Module, round_num: int, partition_id: int, num_examples: int,
              state: dict[str, str | Tensor] | None = None) -> TrainingJob:
    """The round's TrainingJob: the task's loss (:func:`~fedsim.training.task_loss`: cross-entropy, or MSE for a
    regression), then every defense's ``wrap_training`` (in composition order)."""
    job = TrainingJob(model, loss_fn=task_loss(setup.data.task), state=dict(state or {}), seed=setup.scenario.seed,
                      round=round_num, partition_id=partition_id, num_examples=num_examples)
    for defense in setup.defenses:
        job = defense.wrap_training(job)
    return job


def apply_update_defenses(defenses: Sequence[Defense], result: LocalResult, global_state: dict[str, Tensor],
                          ctx: UpdateContext) -> dict[str, Tensor]:
    """Run the update-stage defenses on what is sent; their randomness goes into ``result.extras``.

    fedsgd: on the gradient. fedavg: on the floating-point delta (local - global); the returned
    weights are global + transformed delta (integer buffers such as BatchNorm's counter pass as they are).
    """
    update = result.update
    chosen = update_defenses(defenses)
    if not chosen:
        return update
    if ctx.protocol == "fedavg":
        delta = {k: v - global_state[k].to(v.device) for k, v in update.items() if v.is_floating_point()}
        for d in chosen:
            delta, noise = d.transform_update(delta, ctx)
            result.extras.update({f"{d.name}/{k}": v for k, v in noise.items()})
        return {k: (global_state[k].to(v.device) + delta[k]) if k in delta else v for k, v in update.items()}
    for d in chosen:
        update, noise = d.transform_update(update, ctx)
        result.extras.update({f"{d.name}/{k}": v for k, v in noise.items()})
    return update


def inspect_model(setup: FederationSetup, received: nn.Module, architecture: Sequence[Mapping[str, Any]],
                  ctx: UpdateContext) -> dict[str, float]:
    """Every defense's ``inspect_model`` on the ``received`` model (with the server's weights), against the agreed
    architecture with the client's copy of the initial weights; their metrics merged. Raises ModelRefusedError."""
    chosen = [d for d in setup.defenses if type(d).inspect_model is not Defense.inspect_model]
    metrics: dict[str, float] = {}
    if chosen:
        agreed = setup.build_model()
        for d in chosen:
            metrics.update(d.inspect_model(received, agreed, tuple(architecture), ctx))
    return metrics


def run_client_round(scenario: Scenario, partition_id: int, round_num: int, global_state: dict[str, Tensor],
                     state: dict[str, str | Tensor], *, record: bool = False,
                     architecture: Sequence[Mapping[str, Any]] = ()) -> ClientReply:
    """Client ``partition_id``'s round ``round_num`` from the global weights ``global_state``.

    ``architecture``: the changes a malicious server shipped with ``global_state`` (applied to the agreed model
    before loading it; () for the agreed model). ``state`` is the client's persistent state and is updated in
    place (the caller stores it back into its Context). Raises ModelRefusedError when a defense refuses the model,
    and whatever the local training raises (the caller's error mod turns either into an error reply).
    """
    setup = setup_for(scenario)
    fed = scenario.federation
    if architecture:  # a malicious server's changes: a module of that shape, built for this round
        model, reused = apply_architecture(setup.build_model(), architecture), False
        model.load_state_dict(global_state)
    else:
        model, reused = setup.client_model(global_state)
    inputs, labels = setup.client_data(partition_id)
    inspected = inspect_model(setup, model, architecture, UpdateContext(
        scenario.seed, round_num, partition_id, fed.protocol, len(inputs), state=state))
    job = build_job(setup, model, round_num, partition_id, len(inputs), state)
    result = local_update(
        job, inputs, labels, local=fed.local, protocol=fed.protocol,
        mean=setup.task.mean, std=setup.task.std, seed=scenario.seed,
        round_num=round_num, partition_id=partition_id, device=setup.device, record=record,
        augmentation=augmentation_for(fed.local.augmentation, scenario.data.dataset, tuple(inputs.shape[1:])),
    )
    state.clear()
    state.update(job.state)
    ctx = UpdateContext(scenario.seed, round_num, partition_id, fed.protocol, result.num_examples)
    sent = apply_update_defenses(setup.defenses, result, global_state, ctx)
    metrics: dict[str, Metric] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.PARTITION_ID: partition_id,
        keys.TRAIN_LOSS: result.train_loss,
        **{f"{keys.CLIENT_METRIC_PREFIX}{k}": float(v) for k, v in {**inspected, **result.metrics}.items()},
    }
    truth = None
    if record:
        used = result.used_indices
        truth = {"inputs": inputs[used], "labels": labels[used]}
        truth.update({f"extra/{k}": v.detach().cpu() for k, v in result.extras.items()})
    # a reused module's weights change next round: what is sent must not be a view of them
    shared = _storages(model) if reused else set()
    out = {k: v.detach().cpu() for k, v in sent.items()}
    out = {k: v.clone() if v.untyped_storage().data_ptr() in shared else v for k, v in out.items()}
    return ClientReply(out, result.num_examples, metrics, truth)


def _storages(model: nn.Module) -> set[int]:
    """The memory addresses of ``model``'s parameters and buffers."""
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def load_state(context: Context) -> dict[str, str | Tensor]:
    """The client's persistent state from its Flower Context (strings and tensors); empty on its first round."""
    state: dict[str, str | Tensor] = {}
    record = context.state.config_records.get(keys.CLIENT_STATE)
    if record is not None:
        state.update({k: str(v) for k, v in record.items()})
    arrays = context.state.array_records.get(keys.CLIENT_TENSORS)
    if arrays is not None:
        state.update(arrays.to_torch_state_dict())
    return state


def save_state(context: Context, state: dict[str, str | Tensor]) -> None:
    """Store the client's state back into its Context (kept by the node across rounds): strings in a
    ConfigRecord, tensors (CPU clones) in an ArrayRecord. A key dropped from ``state`` is dropped there too."""
    strings = {k: v for k, v in state.items() if isinstance(v, str)}
    tensors = {k: v.detach().cpu().clone() for k, v in state.items() if isinstance(v, Tensor)}
    if len(strings) + len(tensors) != len(state):
        bad = sorted(k for k, v in state.items() if not isinstance(v, str | Tensor))
        raise TypeError(f"client state values must be str or Tensor: {bad}")
    for key, values, make in ((keys.CLIENT_STATE, strings, ConfigRecord), (keys.CLIENT_TENSORS, tensors, ArrayRecord)):
        if values:
            context.state[key] = make(values)
        elif key in context.state:
            del context.state[key]
