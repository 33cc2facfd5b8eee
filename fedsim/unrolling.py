"""Differentiable unrolling of a FedAvg client's local SGD steps (Geiping et al., NeurIPS 2020).

A FedAvg client starting from ``theta_0`` takes E plain-SGD steps on its n examples,

    theta_{i+1} = theta_i - lr * (grad_theta loss(f_{theta_i}(x_{b(i)}), y_{b(i)}) + wd * theta_i),

and sends ``delta = theta_E - theta_0``. :func:`unrolled_delta` replays those steps on dummy inputs
with ``torch.func.functional_call`` and ``create_graph=True``, so the predicted delta is a
differentiable function of the inputs (``inversefed``'s ``loss_steps``, breaching's unrolled
``GradientLoss``).

Neutral math shared by the attacks (:mod:`fedsim.attacks.unrolling`, :mod:`fedsim.attacks.fedavg_inversion`) and the
server's own stale-update conversion (:mod:`fedsim.simulation.stale_gi`, spec ``algorithms-more.md`` §12.2):
it lives in the core so that the core never imports a plug-in module. It reads no data.

Step ``i`` uses the dummy slice ``i mod ceil(n / bs)`` (inversefed's rule); full-batch steps are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.training import epoch_bounds

LossFn = Callable[[Tensor, Tensor], Tensor]


def step_slices(num_examples: int, batch_size: int, steps: int, min_batch: int = 1) -> list[slice]:
    """The assumed batch of each local step: slice ``i mod ceil(n / bs)`` of the dummy batch.

    ``min_batch`` 2 (a victim that cannot train on one example, see
    :func:`fedsim.training.min_train_batch`) repeats what the client did: a pass's lone last example
    joins the slice before it (:func:`fedsim.training.epoch_bounds`, the rule the client's
    :func:`~fedsim.training.batch_schedule` follows).
    """
    if num_examples < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"cannot schedule {steps} steps of {batch_size} over {num_examples} examples")
    if min_batch > 1:
        bounds = epoch_bounds(num_examples, batch_size, min_batch)
        return [slice(*bounds[i % len(bounds)]) for i in range(steps)]
    per_epoch = math.ceil(num_examples / batch_size)
    return [slice((i % per_epoch) * batch_size, (i % per_epoch + 1) * batch_size) for i in range(steps)]


@dataclass(frozen=True)
class Sharpness:
    """DP-SAT's perturbed point (Park et al., ICML 2023; spec ``algorithms-more.md`` §10.2), as a
    defense-aware attacker models it: step t's gradient is taken at ``theta_t + rho * d / |d|_2`` (one
    global norm over all parameters), ``d`` the previous simulated step's gradient (``variant`` "sat")
    or its update ``theta_{t-1} - theta_t`` ("momentum"); the first step of the round is unperturbed."""

    rho: float
    variant: Literal["sat", "momentum"] = "sat"


def _shifted(theta: list[Tensor], direction: list[Tensor] | None, rho: float) -> list[Tensor]:
    """``theta + rho * direction / |direction|`` (unchanged without a direction, with rho 0 or a zero one)."""
    if direction is None or rho == 0:
        return theta
    norm = torch.sqrt(sum(d.pow(2).sum() for d in direction))
    if not bool(torch.isfinite(norm.detach())) or float(norm.detach()) == 0.0:
        return theta
    return [p + (rho / norm) * d for p, d in zip(theta, direction, strict=True)]


def unrolled_delta(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    weight_decay: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    min_batch: int = 1,
    sharpness: Sharpness | None = None,
) -> list[Tensor]:
    """``theta_E - theta_0`` per entry of ``model.named_parameters()``, differentiable in ``x``.

    The model runs in its current mode (attacker mode: BatchNorm on batch statistics, as the client
    trained); its parameters and buffers are left untouched (buffers are updated on copies). With
    ``sharpness`` (DP-SAT) each step's gradient is taken at the perturbed point of :class:`Sharpness`,
    while the step itself starts from the unperturbed ``theta_t``; the perturbation direction stays in
    the graph (it depends on ``x`` too).
    """
    names = [name for name, _ in model.named_parameters()]
    theta0 = [p for _, p in model.named_parameters()]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    theta = list(theta0)
    direction: list[Tensor] | None = None
    for part in step_slices(len(x), batch_size, steps, min_batch):
        point = theta if sharpness is None else _shifted(theta, direction, sharpness.rho)
        state = {**dict(zip(names, point, strict=True)), **buffers}
        loss = loss_fn(functional_call(model, state, (x[part],)), labels[part])
        grads = torch.autograd.grad(loss, point, create_graph=True)
        new = [p - lr * (g + weight_decay * p) if weight_decay else p - lr * g
               for p, g in zip(theta, grads, strict=True)]
        if sharpness is not None:
            direction = list(grads) if sharpness.variant == "sat" else [a - b for a, b in zip(theta, new, strict=True)]
        theta = new
    return [p - p0 for p, p0 in zip(theta, theta0, strict=True)]
