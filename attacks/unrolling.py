"""The attack side of unrolling a FedAvg client's local SGD steps (Geiping et al., NeurIPS 2020).

The differentiable replay itself (:func:`unrolled_delta`, :func:`step_slices`, :class:`Sharpness`) is
:mod:`fedsim.unrolling`, shared with the server's stale-update conversion and re-exported here.

**Batch assignment is an assumption.** The client shuffles its examples with a seed the attacker
does not know (:func:`fedsim.training.batch_schedule`), so step ``i`` is assumed to use the dummy
slice ``i mod ceil(n / bs)`` (inversefed's rule). The dummies are free variables, so for the images
this only matters when the client reshuffles (several epochs); full-batch steps are exact. Their
*labels* are fixed, though, and the order in which the client's labels met the steps is unknown
when they are inferred (sorted by class): :func:`label_assignments` proposes one order per restart.
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
