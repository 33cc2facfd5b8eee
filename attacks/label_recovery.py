"""Label inference from a client's update alone (no model run, no ground truth).

For a last linear layer ``z = W h + b`` under softmax cross-entropy averaged over a batch of B,

    dL/db_c = (1/B) sum_i (p_ic - y_ic),        dL/dW_c = (1/B) sum_i (p_ic - y_ic) h_i,

where ``p`` are the softmax outputs and ``y`` the one-hot labels. Since ``0 < p_ic < 1``, a class can
only get a negative bias gradient if it is in the batch; with non-negative features ``h`` (ReLU, and
sigmoid) the same holds for the weight rows' sums. Every strategy in :data:`LABEL_STRATEGIES` maps
``(signal, row_minima, num_labels)`` to a LongTensor of ``num_labels`` labels, sorted by class (the
order of a batch cannot be recovered from a summed gradient; metrics match images to labels).

For FedAvg the update is a weight delta; ``-delta`` points along the summed local gradients, whose
signs carry the same information (exactly so for one local step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.threat import ClientUpdate


@dataclass(frozen=True)
class LastLayer:
    """Gradient of the classifier layer: weight (K, d), bias (K,) or None."""

    weight: Tensor
    bias: Tensor | None

    @property
    def signal(self) -> Tensor:
        """Per-class signal: the bias gradient if there is a bias, else the weight rows' sums."""
        return self.bias if self.bias is not None else self.weight.sum(dim=1)


Strategy = Callable[[LastLayer, int], Tensor]


def last_layer_gradients(update: ClientUpdate) -> LastLayer:
    """Find the last parameter of shape (num_classes, d) in the update, and its bias of shape (K,).

    The bias is the entry whose name swaps the trailing ``weight`` for ``bias``. Raises ``ValueError``
    if the update holds no such layer. FedAvg deltas are negated into descent directions.
    """
    if update.update is None:
        raise ValueError("the client sent no update")
    k = update.task.num_classes
    sign = -1.0 if update.task.protocol == "fedavg" else 1.0
    items = [(n, torch.as_tensor(v)) for n, v in update.update.items()]
    found = [(n, v) for n, v in items if v.dim() == 2 and v.shape[0] == k and v.is_floating_point()]
    if not found:
        raise ValueError(f"the update has no classifier weight of shape ({k}, d)")
    name, weight = found[-1]
    bias = None
    if name.endswith("weight"):
        b = update.update.get(name[: -len("weight")] + "bias")
        if b is not None and tuple(b.shape) == (k,):
            bias = sign * torch.as_tensor(b).detach().double()
    return LastLayer(sign * weight.detach().double(), bias)


def _smallest(scores: Tensor, n: int) -> Tensor:
    """The n classes with the smallest scores; beyond K labels, classes repeat in that order."""
    order = torch.argsort(scores)
    return order.repeat(-(-n // len(order)))[:n]


def idlg(layer: LastLayer, num_labels: int) -> Tensor:
    """iDLG (Zhao et al., 2020): ``argmin_c sum_j dW[c, j]``, exact for B = 1 with non-negative h.

    For B > 1 it takes the B smallest row sums (the batch extension of ``inversefed``/GIFD), which
    assumes that the labels are distinct.
    """
    return torch.sort(_smallest(layer.weight.sum(dim=1), num_labels)).values


def yin(layer: LastLayer, num_labels: int) -> Tensor:
    """Yin et al. (CVPR 2021): the B classes whose weight-gradient rows have the smallest minima."""
    return torch.sort(_smallest(layer.weight.min(dim=1).values, num_labels)).values


def bias_corrected(layer: LastLayer, num_labels: int) -> Tensor:
    """Count-aware recovery after Wainakh et al. (PoPETs 2022, "LLG+"), with an offset correction.

    With signal ``s_c`` (bias gradient, else weight row sum) and mean probability ``pbar_c``,
    ``B * s_c = B * pbar_c - n_c`` for class count ``n_c`` (up to a feature-scale factor without bias).

    1. Present classes: those with ``s_c < 0`` (a count of at least 1 each is certain).
    2. Offset: absent classes have ``s_c = pbar_c > 0``; their mean estimates ``pbar`` for the present
       ones (exact when predictions are near uniform, as for untrained or early models).
    3. Impact: ``d_c = pbar - s_c`` is proportional to ``n_c``; scaling ``d`` so that the present
       counts sum to B (the "impact" of one label, Wainakh's m) also absorbs the feature scale.
    4. Rounding: one label per present class, then the remaining ones one at a time to the class
       with the largest residual ``n_hat_c - assigned_c``.
    """
    s = layer.signal
    k = len(s)
    present = torch.nonzero(s < 0).flatten()
    if len(present) == 0:
        present = torch.arange(k)
    if len(present) > num_labels:
        present = present[torch.argsort(s[present])[:num_labels]]
    absent = torch.ones(k, dtype=torch.bool)
    absent[present] = False
    offset = s[absent].mean() if bool(absent.any()) else torch.zeros((), dtype=s.dtype)
    d = (offset - s[present]).clamp_min(0)
    total = d.sum()
    n_hat = d * (num_labels / total) if total > 0 else torch.full_like(d, num_labels / len(present))
    counts = torch.ones(len(present), dtype=torch.long)
    for _ in range(num_labels - len(present)):
        counts[torch.argmax(n_hat - counts)] += 1
    return torch.sort(torch.repeat_interleave(present, counts)).values


def auto(layer: LastLayer, num_labels: int) -> Tensor:
    """iDLG for a single example, the count-aware ``bias-corrected`` method for batches."""
    return idlg(layer, num_labels) if num_labels == 1 else bias_corrected(layer, num_labels)


LABEL_STRATEGIES: dict[str, Strategy] = {
    "auto": auto,
    "idlg": idlg,
    "yin": yin,
    "bias-corrected": bias_corrected,
}


def recover_labels(update: ClientUpdate, num_labels: int | None = None, strategy: str = "auto") -> Tensor:
    """Infer ``num_labels`` (default ``update.num_examples``) labels from the update alone.

    Returns a LongTensor of shape (num_labels,) sorted by class. Raises ``ValueError`` for an unknown
    strategy or an update without a classifier layer.
    """
    if strategy not in LABEL_STRATEGIES:
        raise ValueError(f"unknown label strategy {strategy!r} (known: {', '.join(LABEL_STRATEGIES)})")
    n = int(update.num_examples if num_labels is None else num_labels)
    if n < 1:
        raise ValueError(f"cannot recover {n} labels")
    return LABEL_STRATEGIES[strategy](last_layer_gradients(update), n).long()
