"""Differentiable unrolling of a FedAvg client's local SGD steps (Geiping et al., NeurIPS 2020).

A FedAvg client starting from ``theta_0`` takes E plain-SGD steps on its n examples,

    theta_{i+1} = theta_i - lr * (grad_theta CE(f_{theta_i}(x_{b(i)}), y_{b(i)}) + wd * theta_i),

and sends ``delta = theta_E - theta_0``. :func:`unrolled_delta` replays those steps on dummy inputs
with ``torch.func.functional_call`` and ``create_graph=True``, so the predicted delta is a
differentiable function of the inputs (``inversefed``'s ``loss_steps``, breaching's unrolled
``GradientLoss``).

**Batch assignment is an assumption.** The client shuffles its examples with a seed the attacker
does not know (:func:`fedsim.training.batch_schedule`), so step ``i`` is assumed to use the dummy
slice ``i mod ceil(n / bs)`` (inversefed's rule). The dummies are free variables, so for the images
this only matters when the client reshuffles (several epochs); full-batch steps are exact. Their
*labels* are fixed, though, and the order in which the client's labels met the steps is unknown
when they are inferred (sorted by class): :func:`label_assignments` proposes one order per restart.

The unrolling math itself (:func:`unrolled_delta`, :func:`step_slices`, :class:`Sharpness`) lives in
:mod:`fedsim.unrolling`, shared with the server's stale-update conversion; it is re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsim.training import epoch_bounds
from fedsim.unrolling import LossFn, Sharpness, step_slices, unrolled_delta

__all__ = ["LossFn", "Sharpness", "label_assignments", "step_slices", "unrolled_delta"]


def label_assignments(labels: Tensor, count: int, batch_size: int, generator: torch.Generator,
                      min_batch: int = 1) -> list[Tensor]:
    """``count`` orders of ``labels`` over the dummy slices: ``labels`` as given first, then random
    permutations whose per-slice label multisets differ from those already proposed (when possible,
    within a few draws). With one batch (``batch_size >= n``) the order is irrelevant: all equal."""
    n = len(labels)
    parts = step_slices(n, batch_size, len(epoch_bounds(n, batch_size, min_batch)), min_batch) if n else []

    def key(order: Tensor) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(sorted(order[part].tolist())) for part in parts)

    out, seen = [labels], {key(labels)}
    while len(out) < count:
        order = labels
        if len(parts) > 1:
            for _ in range(16):
                order = labels[torch.randperm(n, generator=generator).to(labels.device)]
                if key(order) not in seen:
                    break
        seen.add(key(order))
        out.append(order)
    return out
