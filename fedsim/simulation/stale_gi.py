"""The server's gradient-inversion (GI) conversion of a stale update (Wang & Gao, AAAI 2025; spec
``algorithms-more.md`` §12.2), the ``gi_conversion`` rule of :data:`fedsim.simulation.staleness.STALE_RULES`.

A slow client sent ``w_i``, trained from ``w^{t-1-tau}``; ``delta = w_i - w^{t-1-tau}``. The server:

A. **inverts** delta into ``N = gi.num_estimates`` inputs ``X`` (normalized space, boxed to the pixel range
   [0, 1]) and free label logits ``Y`` (soft labels ``softmax(Y)``) by minimizing the L1 distance
   ``sum_j |U_j(X, Y; w^{t-1-tau}) - delta_j|`` over the ``gi.topk`` fraction of delta's largest-magnitude
   entries (one selection over all parameters), where ``U`` unrolls the client's E local SGD steps (E from
   ``federation.local`` and the client's declared example count, as the client schedules them) as full-batch
   steps on the estimate with the client's soft-label cross-entropy (the spec's preferred loss; the authors'
   BCE variant is not offered) in train mode like the client (:func:`fedsim.unrolling.unrolled_delta`).
   Adam at ``gi.lr`` (signed gradient for X, plain for Y), lr x0.1 at 3/8, 5/8, 7/8 of ``gi.iterations``;
   ``X, Y`` start from N(0, 1) drawn from (seed, round, client) (``gi.init: gray``: X from 0.1 N(0, 1), i.e. the
   dataset-mean image plus a little noise, a prior that reads no client data), or (``gi.warm_start``) from this
   client's previous estimate, kept in the arrival's per-client ``memory``. ``gi.tv`` > 0 adds ``tv`` times the
   estimates' total variation (:func:`total_variation`; images only) to the L1 (the authors: TV 0);
B. **recomputes** ``delta_hat = U(X*, Y*; w^{t-1})``: the same E steps from the current model;
C. **mixes**: the client's model in the mean is ``w^{t-1} + lambda_t delta_hat + (1 - lambda_t) delta`` on the
   trainable parameters (buffers: ``w^{t-1} + delta``, like ``direct``). ``lambda_t`` = 1 before the switch round
   s; after it 0 (``mix: hard``, the code's semantics) or ``gamma^(t - s)`` (``decay``). s is
   ``gi.switch_round`` or, with ``gi.drift_threshold``, the first of this client's arrivals at which
   ``|w^{t-1} - w^{t-1-tau}| / |w^{t-1}|`` (read from the two models, never from client data) fell below the
   threshold, whichever comes first. With lambda_t = 0 no inversion runs.

The estimate is a reconstruction of the client's data: each inversion leaves an :class:`EstimateRecord` in
``memory["estimate_record"]`` for :class:`fedsim.simulation.stale_server.StaleModels` to hand to the evaluator
(:mod:`fedsim.simulation.stale_leakage`), which alone reads the client's true data. This module reads none.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.data.transforms import denormalize, normalize
from fedsim.errors import ScenarioError
from fedsim.image_priors import total_variation
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed, seed_torch, torch_generator
from fedsim.stale_gi_spec import GIConversion
from fedsim.threat import TaskInfo
from fedsim.training import epoch_bounds, min_train_batch
from fedsim.unrolling import unrolled_delta

if TYPE_CHECKING:
    from fedsim.simulation.staleness import StaleArrival


@dataclass(frozen=True)
class EstimateRecord:
    """One inversion: the server's estimate of client ``partition_id``'s data in ``round`` (``pixels`` (N, C, H, W)
    in [0, 1] for images, else the features; ``soft_labels`` (N, K)), its final L1 ``loss``, the mixing weight
    ``lam``, ``iterations`` run, wall ``seconds``, and whether it was ``warm``-started."""

    round: int
    partition_id: int
    tau: int
    lam: float
    pixels: Tensor
    soft_labels: Tensor
    loss: float
    iterations: int
    seconds: float
    warm: bool
    # the server's cold start for this arrival (same layout as ``pixels``), never optimised: a trivial guess
    initial: Tensor | None = None

    @property
    def failed(self) -> bool:
        """The inversion diverged: its final loss or estimate is not finite (it is not scored or used)."""
        return not math.isfinite(self.loss) or not bool(torch.isfinite(self.pixels).all())


def settings(scenario: Scenario) -> GIConversion:
    """``federation.staleness.gi``, or its defaults."""
    return scenario.federation.staleness.gi or GIConversion()


def check_gi(scenario: Scenario, num_classes: int | None) -> None:
    """Refuse (ScenarioError at its YAML path) a ``gi_conversion`` the server cannot run: clients whose steps cannot
    be unrolled (not plain SGD), or a task without classes (``num_classes`` 0; None skips that check)."""
    stale = scenario.federation.staleness
    if stale is None or stale.aggregation != "gi_conversion":
        return
    local = scenario.federation.local
    if local.optimizer != "sgd":
        raise ScenarioError("federation.local.optimizer", f"gi_conversion unrolls plain SGD steps, not "
                            f"{local.optimizer}")
    if local.momentum != 0:
        raise ScenarioError("federation.local.momentum", "gi_conversion unrolls plain SGD steps: momentum must be 0")
    if num_classes == 0:
        raise ScenarioError("federation.staleness.aggregation", "gi_conversion estimates soft class labels: "
                            "a regression task has none")


def mixing_weight(arrival: StaleArrival, gi: GIConversion) -> float:
    """``lambda_t`` of this arrival (module docstring, C); records this client's drift switch (``drift_switch``)
    and, once ``t >= s``, its switch round s (``switch_round``) in its memory."""
    t = arrival.round
    if gi.drift_threshold is not None and "drift_switch" not in arrival.memory:
        num = sum(float((arrival.current[k].double() - arrival.base[k].double()).pow(2).sum())
                  for k, v in arrival.current.items() if v.is_floating_point())
        den = sum(float(v.double().pow(2).sum()) for v in arrival.current.values() if v.is_floating_point())
        if math.sqrt(num) < gi.drift_threshold * math.sqrt(den):
            arrival.memory["drift_switch"] = t
    candidates = [s for s in (gi.switch_round, arrival.memory.get("drift_switch")) if s is not None]
    if not candidates or t < min(candidates):
        return 1.0
    arrival.memory.setdefault("switch_round", min(candidates))  # s, read by the server's outputs
    return 0.0 if gi.mix == "hard" else gi.gamma ** (t - min(candidates))


def local_steps(scenario: Scenario, num_examples: int, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """E: the local SGD steps a client with ``num_examples`` takes (``local.steps``, else ``epochs`` passes of
    :func:`fedsim.training.epoch_bounds`, as :func:`fedsim.training.batch_schedule` schedules them)."""
    local = scenario.federation.local
    if local.steps is not None:
        return local.steps
    n = max(int(num_examples), 1)
    return local.epochs * len(epoch_bounds(n, min(local.batch_size, n), min_train_batch(model, input_shape)))


def soft_cross_entropy(outputs: Tensor, logits: Tensor) -> Tensor:
    """Cross-entropy of ``outputs`` against the soft labels ``softmax(logits)`` (mean over the batch)."""
    return F.cross_entropy(outputs, logits.softmax(dim=-1))


def predicted_delta(model: nn.Module, state: dict[str, Tensor], x: Tensor, logits: Tensor, steps: int,
                    scenario: Scenario) -> list[Tensor]:
    """``U(x, logits; state)``: E full-batch local SGD steps from ``state`` (per trainable parameter, in
    ``model.named_parameters()`` order), differentiable in ``x`` and ``logits``; dropout seeded."""
    local = scenario.federation.local
    model.load_state_dict(state)
    model.train()
    with torch.random.fork_rng(devices=[]):
        seed_torch(derive_seed(scenario.seed, "stale-gi-dropout"))
        return unrolled_delta(model, x, logits, lr=local.lr, steps=steps, batch_size=len(x),
                              weight_decay=local.weight_decay, loss_fn=soft_cross_entropy)


def topk_masks(delta: list[Tensor], fraction: float) -> list[Tensor]:
    """Per tensor, where the ``ceil(fraction * total)`` largest-magnitude entries of all of ``delta`` lie."""
    flat = torch.cat([d.detach().abs().flatten() for d in delta])
    k = max(1, math.ceil(fraction * flat.numel()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    return [m.view_as(d) for m, d in zip(chosen.split([d.numel() for d in delta]), delta, strict=True)]


def l1_topk(pred: list[Tensor], target: list[Tensor], masks: list[Tensor]) -> Tensor:
    """``sum_j |pred_j - target_j|`` over the masked entries (spec §12.2 A)."""
    return sum(((p - t).abs() * m).sum() for p, t, m in zip(pred, target, masks, strict=True))


def pixel_box(task: TaskInfo) -> tuple[Tensor, Tensor] | None:
    """Images: the normalized range (low, high), each (1, C, H, W), of pixels in [0, 1] (spec 12.6); else None."""
    if len(task.input_shape) != 3:
        return None
    return (normalize(torch.zeros(1, *task.input_shape), task.mean, task.std),
            normalize(torch.ones(1, *task.input_shape), task.mean, task.std))


def cold_start(arrival: StaleArrival, scenario: Scenario, task: TaskInfo) -> tuple[Tensor, Tensor]:
    """The estimate's start without a warm start, drawn from (seed, round, client) alone (reads no data):
    inputs (N, *input_shape) N(0, 1), or 0.1 N(0, 1) for ``gi.init: gray`` (the dataset-mean image + a little
    noise, normalized space); label logits (N, K) N(0, 1)."""
    gi = settings(scenario)
    gen = torch_generator(scenario.seed, "stale-gi-init", arrival.round, arrival.partition_id)
    x = torch.randn((gi.num_estimates, *task.input_shape), generator=gen)
    if gi.init == "gray":
        x = 0.1 * x
    return x, torch.randn((gi.num_estimates, task.num_classes), generator=gen)


def invert(arrival: StaleArrival, scenario: Scenario, model: nn.Module, steps: int,
           task: TaskInfo) -> tuple[Tensor, Tensor, float, bool]:
    """Spec §12.2 A: the estimate ``(X, Y)`` (normalized inputs, label logits), its final loss, and whether it was
    warm-started. ``task``: what the server knows of the task (shapes, classes, normalization; no data)."""
    gi = settings(scenario)
    names = [n for n, _ in model.named_parameters()]
    target = [(arrival.local[n] - arrival.base[n]).float() for n in names]
    masks = topk_masks(target, gi.topk)
    previous = arrival.memory.get("estimate") if gi.warm_start else None
    shape = (gi.num_estimates, *task.input_shape)
    if previous is not None and tuple(previous[0].shape) == shape:
        x, logits = previous[0].clone(), previous[1].clone()
    else:
        x, logits = cold_start(arrival, scenario, task)
        previous = None
    box = pixel_box(task)
    if box is not None:
        x = torch.max(torch.min(x, box[1]), box[0])
    x.requires_grad_(True)
    logits.requires_grad_(True)
    opt = torch.optim.Adam([x, logits], lr=gi.lr)
    milestones = sorted({int(gi.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(gi.iterations):
        opt.zero_grad(set_to_none=True)
        loss = l1_topk(predicted_delta(model, arrival.base, x, logits, steps, scenario), target, masks)
        if gi.tv > 0 and box is not None:
            loss = loss + gi.tv * total_variation(x)
        x.grad, logits.grad = torch.autograd.grad(loss, [x, logits])
        x.grad = x.grad.sign()
        opt.step()
        sched.step()
        if box is not None:
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, box[1]), box[0]))
    x, logits = x.detach(), logits.detach()
    final = float(l1_topk(predicted_delta(model, arrival.base, x, logits, steps, scenario), target, masks).detach())
    return x, logits, final, previous is not None


def recomputed_delta(scenario: Scenario, model: nn.Module, current: dict[str, Tensor], x: Tensor,
                     logits: Tensor, steps: int) -> dict[str, Tensor]:
    """Spec §12.2 B: ``delta_hat = U(X, Y; w^{t-1})`` per trainable parameter name (detached)."""
    names = [n for n, _ in model.named_parameters()]
    pred = predicted_delta(model, current, x, logits, steps, scenario)
    return {n: d.detach() for n, d in zip(names, pred, strict=True)}


def mixed(arrival: StaleArrival, delta_hat: dict[str, Tensor], lam: float) -> dict[str, Tensor]:
    """``w^{t-1} + lam delta_hat + (1 - lam) delta`` on the keys of ``delta_hat``; other floating-point tensors
    ``w^{t-1} + delta``; the rest as the client sent them."""
    out = {}
    for k, v in arrival.local.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        delta = v - arrival.base[k].to(v.dtype)
        current = arrival.current[k].to(v.dtype)
        if k in delta_hat:
            out[k] = current + lam * delta_hat[k].to(v.dtype) + (1.0 - lam) * delta
        else:
            out[k] = current + delta
    return out


def gi_conversion(arrival: StaleArrival, scenario: Scenario) -> dict[str, Tensor]:
    """The ``gi_conversion`` rule (module docstring): the slow client's model to put in the FedAvg mean."""
    from fedsim.simulation.setup import setup_for

    gi = settings(scenario)
    lam = mixing_weight(arrival, gi)
    if lam == 0.0:
        return mixed(arrival, {}, 0.0)
    start = time.perf_counter()
    setup = setup_for(scenario)
    task = setup.task  # shapes, classes, normalization: what the server knows of the task
    model = setup.build_model()
    steps = local_steps(scenario, arrival.num_examples, model, tuple(task.input_shape))
    x, logits, loss, warm = invert(arrival, scenario, model, steps, task)
    images = len(task.input_shape) == 3
    box = pixel_box(task)
    initial = cold_start(arrival, scenario, task)[0]
    if box is not None:
        initial = torch.max(torch.min(initial, box[1]), box[0])
    pixels = denormalize(x, task.mean, task.std) if images else x
    record = EstimateRecord(
        round=arrival.round, partition_id=arrival.partition_id, tau=arrival.tau, lam=lam, pixels=pixels.clone(),
        soft_labels=logits.softmax(dim=-1), loss=loss, iterations=gi.iterations,
        seconds=time.perf_counter() - start, warm=warm,
        initial=denormalize(initial, task.mean, task.std) if images else initial)
    arrival.memory["estimate_record"] = record
    if record.failed:  # a diverged inversion: the stale update as it came (direct), and no warm start from it
        arrival.memory.pop("estimate", None)
        return mixed(arrival, {}, 0.0)
    arrival.memory["estimate"] = (x, logits)
    delta_hat = recomputed_delta(scenario, model, arrival.current, x, logits, steps)
    return mixed(arrival, delta_hat, lam)
