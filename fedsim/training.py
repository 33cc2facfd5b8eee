"""A client's local work and the global model's evaluation, with no Flower in sight.

This is the ``task.py`` role of Flower's examples: the ClientApp calls :func:`local_update`, the
server calls :func:`evaluate`, and benchmarks call both directly to compare against a bare loop.
Every random draw (batch choice, shuffling, dropout masks) derives from (seed, round, partition id),
so the same client in the same round computes the same update on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.augment import Augmentation
from fedsim.data import normalize
from fedsim.errors import ScenarioError
from fedsim.isolation import isolated_global_rngs
from fedsim.models.layers import record_masks, recorded_masks
from fedsim.scenario import LocalTraining
from fedsim.seeding import derive_seed, seed_torch, torch_generator

LossFn = Callable[..., Tensor]  # (outputs, labels, reduction="mean") -> loss, like F.cross_entropy


def reduce_examples(per_example: Tensor, reduction: str) -> Tensor:
    """Per-example losses (N,) reduced as ``F.cross_entropy``'s ``reduction``: ``"none"`` (N,), ``"sum"``,
    ``"mean"`` (NaN on an empty batch). Raises ValueError for another reduction."""
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if reduction == "mean":
        return per_example.mean()
    raise ValueError(f"unknown reduction {reduction!r} (none, mean or sum)")


def mse_loss(outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error of a regression: ``mean_i mean_j (outputs[i, j] - targets[i, j])^2``, no 1/2 factor
    (``torch.nn.MSELoss`` of DIFF2's authors).

    ``outputs`` (N, 1) (or (N, k)); ``targets`` (N,) (or anything with N*k values) is reshaped to
    ``outputs.shape`` and cast to its dtype. ``reduction`` as in ``F.cross_entropy``: ``"none"`` gives
    the per-example loss (N,) (each example's mean over its outputs: what DP-SGD's ghost clipping asks
    for), ``"sum"`` its sum, ``"mean"`` its mean (= ``F.mse_loss``; NaN on an empty batch, as cross-entropy).
    """
    per_element = F.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape), reduction="none")
    per_example = per_element if per_element.dim() == 1 else per_element.flatten(1).mean(dim=1)
    return reduce_examples(per_example, reduction)


def lm_loss(outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of a causal language model (nats per predicted token).

    ``outputs`` (N, T, V) logits, position t predicting token t+1; ``targets`` (N, T) int64 token ids (the
    input sequence itself). Each example's loss is the mean over its T-1 predictions; ``reduction`` as in
    ``F.cross_entropy``: ``"none"`` gives (N,) (what DP-SGD's per-example clipping needs), ``"sum"`` their sum,
    ``"mean"`` their mean (= the mean over every predicted token, since all examples have T tokens).
    Perplexity is ``exp`` of the mean.
    """
    n, t, v = outputs.shape
    per_token = F.cross_entropy(outputs[:, :-1].reshape(-1, v), targets[:, 1:].reshape(-1), reduction="none")
    per_example = per_token.view(n, t - 1).mean(dim=1)
    return reduce_examples(per_example, reduction)


def task_loss(task: str) -> LossFn:
    """The training loss of a task kind: cross-entropy for ``classification``, :func:`mse_loss` for
    ``regression``, :func:`lm_loss` for ``language_modeling``. All take ``reduction=``."""
    if task == "language_modeling":
        return lm_loss
    if task == "regression":
        return mse_loss
    if task == "classification":
        return F.cross_entropy
    raise ValueError(f"unknown task kind {task!r} (classification or regression)")


@dataclass
class LocalResult:
    """The update a client computed, and what it really used (ground truth for the evaluator)."""

    update: dict[str, Tensor]  # fedsgd: gradient per parameter name; fedavg: the new state_dict
    num_examples: int  # what the client declares (the real count, or DP-SGD's expected one)
    used_indices: Tensor  # indices into the client's partition, in first-use order
    train_loss: float
    extras: dict[str, Tensor] = field(default_factory=dict)  # dropout masks, batch schedule, ...
    metrics: dict[str, float] = field(default_factory=dict)  # reported by defenses, e.g. epsilon


def make_optimizer(model: nn.Module, local: LocalTraining) -> torch.optim.Optimizer:
    """The optimizer the scenario names (``federation.local.optimizer``)."""
    if local.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=local.lr, weight_decay=local.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay
    )


@dataclass
class TrainingJob:
    """What a client trains with in one round. Defenses' ``wrap_training`` hook may replace any part.

    * ``loss_fn(logits, labels)``: the task's loss (:func:`task_loss`: cross-entropy, or MSE for a
      regression; :func:`fedsim.simulation.client_round.build_job` sets it), then e.g. MID's loss + beta*KL.
    * ``make_optimizer(model, local)``: e.g. an Opacus ``DPOptimizer`` (per-sample clipping + noise).
    * ``sample_batches(n, local, protocol, generator)``: the round's index batches (default
      :func:`batch_schedule`; DP-SGD substitutes Poisson sampling, which its accountant assumes).
    * ``before_read_gradients(optimizer)``: fedsgd sends ``p.grad`` after this runs (DP-SGD calls the
      optimizer's ``pre_step`` here so that the sent gradient is the clipped, noised one).
    * ``declare_num_examples(n, batches)``: the ``num-examples`` the client sends (FedAvg's weight, and
      what the server learns of the batch), or None for the real count. DP-SGD declares an expected
      count so that the realised Poisson batch sizes, which no accountant covers, stay private.
    * ``on_finish(steps, batch_sizes)``: runs after the round, returns metrics the client reports
      (e.g. epsilon); ``state`` persists across rounds per client (Flower ``Context.state``): strings
      (e.g. an accountant's history as JSON) and tensors (e.g. a model the client must remember).
    """

    model: nn.Module
    loss_fn: LossFn = F.cross_entropy
    make_optimizer: Callable[[nn.Module, LocalTraining], torch.optim.Optimizer] = make_optimizer
    sample_batches: Callable[[int, LocalTraining, str, torch.Generator], list[Tensor]] | None = None
    before_read_gradients: Callable[[torch.optim.Optimizer], None] | None = None
    declare_num_examples: Callable[[int, list[Tensor]], int | None] | None = None
    on_finish: list[Callable[[int, list[int]], dict[str, float]]] = field(default_factory=list)
    state: dict[str, str | Tensor] = field(default_factory=dict)
    seed: int = 0
    round: int = 0
    partition_id: int = 0
    num_examples: int = 0  # size of the client's partition (for sampling rates)


def batch_schedule(n: int, local: LocalTraining, protocol: str, gen: torch.Generator,
                   min_batch: int = 1) -> list[Tensor]:
    """Index batches a client uses in one round: one batch for fedsgd, epochs or steps for fedavg.

    Each fedavg epoch is a fresh permutation cut into batches of ``min(batch_size, n)``. With
    ``min_batch`` 2 (a model that cannot train on one example, see :func:`min_train_batch`), an epoch
    whose last batch would hold a single example gives that example to the batch before it instead
    (one batch of ``batch_size + 1``), so every example is still used once per epoch; validation
    refuses the cases no schedule can fix (``batch_size`` 1, a client with one example).
    """
    bs = min(local.batch_size, n)
    if protocol == "fedsgd":
        return [torch.randperm(n, generator=gen)[:bs]]
    bounds = epoch_bounds(n, bs, min_batch)
    batches: list[Tensor] = []
    steps = local.steps
    while True:
        order = torch.randperm(n, generator=gen)
        for start, stop in bounds:
            batches.append(order[start:stop])
            if steps is not None and len(batches) == steps:
                return batches
        if steps is None and len(batches) >= local.epochs * len(bounds):
            return batches


def epoch_bounds(n: int, batch_size: int, min_batch: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch in one pass over ``n`` examples: consecutive runs of ``batch_size``,
    the last one shorter; a last run shorter than ``min_batch`` joins the one before it (when there is one)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_batch:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def min_train_batch(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The smallest batch ``model`` can take a training step on: 1, or 2 when a train-mode forward pass
    on a single example fails (BatchNorm, or GroupNorm with one value per group, normalizes over the
    batch: PyTorch raises "Expected more than 1 value per channel when training").

    Runs one no-grad forward pass on a zero example of ``input_shape`` (C, H, W) in train mode; the
    model's buffers (BatchNorm running statistics), the global RNG and the train/eval flags are left as
    they were. Models without normalization layers are answered without a forward pass.
    """
    if not any(isinstance(m, _NORMS) for m in model.modules()):
        return 1
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    flags = [(m, m.training) for m in model.modules()]
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            model.train()
            model(torch.zeros((1, *input_shape), device=device,  # token ids for a text model
                              dtype=torch.long if getattr(model, "vocab_size", 0) else torch.float32))
        return 1
    except (ValueError, RuntimeError):
        return 2
    finally:
        for m, training in flags:
            m.training = training
        buffers = dict(model.named_buffers())
        for name, value in saved.items():
            buffers[name].copy_(value)


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def round_batches(job: TrainingJob, inputs: Tensor, *, local: LocalTraining, protocol: str, seed: int,
                  round_num: int, partition_id: int) -> list[Tensor]:
    """The index batches client ``partition_id`` trains on in round ``round_num``: the job's own sampler
    (e.g. DP-SGD's Poisson batches) or :func:`batch_schedule`, from the (seed, "batches", round, partition
    id) generator. :func:`local_update` uses it, and so does the SecAgg+ evaluator re-deriving a batch."""
    gen = torch_generator(seed, "batches", round_num, partition_id)
    if job.sample_batches is not None:
        return job.sample_batches(len(inputs), local, protocol, gen)
    n, bs = len(inputs), min(local.batch_size, len(inputs))
    # a lone last example in an epoch: only a model that cannot train on one example needs it merged
    lone = protocol == "fedavg" and n > bs and n % bs == 1
    min_batch = min_train_batch(job.model, tuple(inputs.shape[1:])) if lone else 1
    return batch_schedule(n, local, protocol, gen, min_batch=min_batch)


@isolated_global_rngs  # it seeds torch's global RNG for the dropout masks: the caller's state comes back
def local_update(
    job: TrainingJob,
    inputs: Tensor,
    labels: Tensor,
    *,
    local: LocalTraining,
    protocol: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    round_num: int,
    partition_id: int,
    device: torch.device,
    record: bool = False,
    augmentation: Augmentation | None = None,
) -> LocalResult:
    """Run one client's round on its partition (``inputs`` in pixel space [0, 1], or standardized features).

    ``job.model`` already holds the global weights. With ``record`` the dropout masks drawn during the
    round are returned in ``extras`` (only the evaluator may read them). ``augmentation``
    (:mod:`fedsim.augment`) transforms each step's batch in pixel space before normalization (fedsgd: its
    one batch, step 0); ``used_indices`` still name the un-augmented examples the evaluator scores against.
    """

    def batch(idx: Tensor, step: int) -> Tensor:
        x = inputs[idx].to(device)
        if augmentation is not None:
            x = augmentation.apply(x, seed=seed, round_num=round_num, partition_id=partition_id, step=step)
        return normalize(x, mean, std)

    model = job.model
    batches = round_batches(job, inputs, local=local, protocol=protocol, seed=seed, round_num=round_num,
                            partition_id=partition_id)
    seed_torch(derive_seed(seed, "client-torch", round_num, partition_id))  # dropout masks
    model.to(device).train()
    record_masks(model, record)
    extras: dict[str, Tensor] = {}
    losses = []
    if protocol == "fedsgd":
        idx = batches[0]
        opt = job.make_optimizer(model, local)  # never stepped: fedsgd sends the gradient itself
        opt.zero_grad(set_to_none=True)
        x = batch(idx, 0)
        loss = job.loss_fn(model(x), labels[idx].to(device))
        loss.backward()
        if job.before_read_gradients is not None:
            job.before_read_gradients(opt)
        update = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.zero_grad(set_to_none=True)
        if len(idx) > 0:  # Poisson sampling (DP-SGD) may draw an empty batch: a noise-only step, no loss
            losses.append(loss.item())
        if record:
            extras.update({f"mask/{k}": v for k, v in recorded_masks(model).items()})
    else:
        opt = job.make_optimizer(model, local)
        for step, idx in enumerate(batches):
            x = batch(idx, step)
            opt.zero_grad(set_to_none=True)
            loss = job.loss_fn(model(x), labels[idx].to(device))
            loss.backward()
            opt.step()
            if len(idx) > 0:  # Poisson sampling (DP-SGD) may draw an empty batch: a noise-only step, no loss
                losses.append(loss.item())
            if record:
                extras.update({f"mask/step{step}/{k}": v for k, v in recorded_masks(model).items()})
        update = {k: v.detach() for k, v in model.state_dict().items()}
        if record:
            extras["batch_schedule"] = _pad_schedule(batches)
    record_masks(model, False)
    used = _first_use_order(batches)
    metrics: dict[str, float] = {}
    for hook in job.on_finish:
        metrics.update(hook(len(batches), [len(b) for b in batches]))
    num = int(sum(len(b) for b in batches)) if protocol == "fedsgd" else len(used)
    declared = job.declare_num_examples(len(inputs), batches) if job.declare_num_examples is not None else None
    return LocalResult(
        update=update,
        # max(.., 1): SecAgg+ divides by the sum of the clients' weights inside Flower
        num_examples=max(num if declared is None else int(declared), 1),
        used_indices=used,
        train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),  # nan: every batch was empty
        extras=extras,
        metrics=metrics,
    )


def _first_use_order(batches: list[Tensor]) -> Tensor:
    seen: dict[int, None] = {}
    for b in batches:
        for i in b.tolist():
            seen.setdefault(i, None)
    return torch.tensor(list(seen), dtype=torch.long)


def _pad_schedule(batches: list[Tensor]) -> Tensor:
    """Batch schedule as a (steps, max batch) tensor of partition indices, -1 padded."""
    width = max(len(b) for b in batches)
    out = torch.full((len(batches), width), -1, dtype=torch.long)
    for i, b in enumerate(batches):
        out[i, : len(b)] = b
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    device: torch.device,
    task: str = "classification",
) -> tuple[float, float | None]:
    """``(loss, accuracy)`` of ``model`` (eval mode) on a test set in the data's stored space.

    Classification: mean cross-entropy and top-1 accuracy. Regression: mean squared error
    (:func:`mse_loss`, the training loss) and ``None``: a regression has no accuracy. Language modeling: mean
    next-token cross-entropy in nats (perplexity = ``exp(loss)``) and next-token top-1 accuracy over every
    predicted token.
    """
    model.to(device).eval()
    loss_fn = task_loss(task)
    total_loss, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        x = normalize(inputs[start : start + batch_size].to(device), mean, std)
        y = labels[start : start + batch_size].to(device)
        outputs = model(x)
        total_loss += loss_fn(outputs, y, reduction="sum").item()
        if task == "classification":
            correct += int((outputs.argmax(1) == y).sum())
        elif task == "language_modeling":
            correct += int((outputs[:, :-1].argmax(-1) == y[:, 1:]).sum())
    n = max(len(inputs), 1)
    if task == "language_modeling":
        return total_loss / n, correct / max(len(inputs) * (inputs.shape[1] - 1), 1) if len(inputs) else 0.0
    return total_loss / n, (correct / n if task == "classification" else None)


def resolve_device(kind: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a scenario error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ScenarioError("device", "cuda was requested but no CUDA device is available (use auto or cpu)")
    if kind in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
