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

from fedsim.data import normalize
from fedsim.errors import ScenarioError
from fedsim.isolation import isolated_global_rngs
from fedsim.models.layers import record_masks, recorded_masks
from fedsim.scenario import LocalTraining
from fedsim.seeding import derive_seed, torch_generator


@dataclass
class LocalResult:
    """The update a client computed, and what it really used (ground truth for the evaluator)."""

    update: dict[str, Tensor]  # fedsgd: gradient per parameter name; fedavg: the new state_dict
    num_examples: int
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

    * ``loss_fn(logits, labels)``: e.g. MID's CE + beta*KL.
    * ``make_optimizer(model, local)``: e.g. an Opacus ``DPOptimizer`` (per-sample clipping + noise).
    * ``sample_batches(n, local, protocol, generator)``: the round's index batches (default
      :func:`batch_schedule`; DP-SGD substitutes Poisson sampling, which its accountant assumes).
    * ``before_read_gradients(optimizer)``: fedsgd sends ``p.grad`` after this runs (DP-SGD calls the
      optimizer's ``pre_step`` here so that the sent gradient is the clipped, noised one).
    * ``on_finish(steps, batch_sizes)``: runs after the round, returns metrics the client reports
      (e.g. epsilon); ``state`` persists across rounds per client (Flower ``Context.state``), e.g. an
      accountant's history as JSON strings.
    """

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    make_optimizer: Callable[[nn.Module, LocalTraining], torch.optim.Optimizer] = make_optimizer
    sample_batches: Callable[[int, LocalTraining, str, torch.Generator], list[Tensor]] | None = None
    before_read_gradients: Callable[[torch.optim.Optimizer], None] | None = None
    on_finish: list[Callable[[int, list[int]], dict[str, float]]] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    round: int = 0
    partition_id: int = 0
    num_examples: int = 0  # size of the client's partition (for sampling rates)


def batch_schedule(n: int, local: LocalTraining, protocol: str, gen: torch.Generator) -> list[Tensor]:
    """Index batches a client uses in one round: one batch for fedsgd, epochs or steps for fedavg."""
    bs = min(local.batch_size, n)
    if protocol == "fedsgd":
        return [torch.randperm(n, generator=gen)[:bs]]
    batches: list[Tensor] = []
    steps = local.steps
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            batches.append(order[start : start + bs])
            if steps is not None and len(batches) == steps:
                return batches
        if steps is None and len(batches) >= local.epochs * -(-n // bs):
            return batches


def round_batches(job: TrainingJob, inputs: Tensor, *, local: LocalTraining, protocol: str, seed: int,
                  round_num: int, partition_id: int) -> list[Tensor]:
    """The index batches client ``partition_id`` trains on in round ``round_num``: the job's own sampler
    (e.g. DP-SGD's Poisson batches) or :func:`batch_schedule`, from the (seed, "batches", round, partition
    id) generator. :func:`local_update` uses it, and so does the SecAgg+ evaluator re-deriving a batch."""
    gen = torch_generator(seed, "batches", round_num, partition_id)
    return (job.sample_batches or batch_schedule)(len(inputs), local, protocol, gen)


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
) -> LocalResult:
    """Run one client's round on its partition (``inputs`` in pixel space [0, 1]).

    ``job.model`` already holds the global weights. With ``record`` the dropout masks drawn during the
    round are returned in ``extras`` (only the evaluator may read them).
    """
    model = job.model
    batches = round_batches(job, inputs, local=local, protocol=protocol, seed=seed, round_num=round_num,
                            partition_id=partition_id)
    torch.manual_seed(derive_seed(seed, "client-torch", round_num, partition_id))  # dropout masks
    model.to(device).train()
    record_masks(model, record)
    extras: dict[str, Tensor] = {}
    losses = []
    if protocol == "fedsgd":
        idx = batches[0]
        opt = job.make_optimizer(model, local)  # never stepped: fedsgd sends the gradient itself
        opt.zero_grad(set_to_none=True)
        x = normalize(inputs[idx].to(device), mean, std)
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
            x = normalize(inputs[idx].to(device), mean, std)
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
    return LocalResult(
        update=update,
        # max(.., 1): an empty Poisson batch still sends a (noise-only) gradient; a FedAvg weight of 0 on
        # every sampled client would divide by zero in the aggregation
        num_examples=max(int(sum(len(b) for b in batches)), 1) if protocol == "fedsgd" else len(used),
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
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` (eval mode) on a pixel-space test set."""
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        x = normalize(inputs[start : start + batch_size].to(device), mean, std)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(inputs), 1)
    return total_loss / n, correct / n


def resolve_device(kind: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a scenario error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ScenarioError("device", "cuda was requested but no CUDA device is available (use auto or cpu)")
    if kind in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
