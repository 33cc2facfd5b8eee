"""Label inference from a client's update (and, optionally, the public global model).

For a last linear layer ``z = W h + b`` under softmax cross-entropy averaged over a batch of B,

    dL/db_c = (1/B) sum_i (p_ic - y_ic),        dL/dW_c = (1/B) sum_i (p_ic - y_ic) h_i,

with ``p`` the softmax outputs and ``y`` the one-hot labels. As ``0 < p_ic < 1``, only a class in the
batch can get a negative bias gradient; with non-negative features ``h`` (ReLU, sigmoid) the same
holds for the weight rows' sums. Every strategy in :data:`LABEL_STRATEGIES` maps a
:class:`LastLayer` and a label count to a LongTensor of labels sorted by class (the order inside a
batch cannot be recovered from a summed gradient; metrics match images to labels).

For FedAvg the update is a weight delta; ``-delta`` points along the summed local gradients, whose
signs carry the same information (exactly so for one local step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsim.threat import ClientUpdate

PROBE_SIZE = 16


@dataclass(frozen=True)
class LastLayer:
    """Gradient of the classifier: weight (K, d), bias (K,) or None, and optionally the model's
    expected softmax ``probs`` (K,) on probe inputs (see :func:`expected_probs`)."""

    weight: Tensor
    bias: Tensor | None = None
    probs: Tensor | None = None


Strategy = Callable[[LastLayer, int], Tensor]


def last_layer_gradients(update: ClientUpdate, probs: Tensor | None = None) -> LastLayer:
    """Find the last entry of shape (num_classes, d) in the update and its bias of shape (K,).

    The bias is the entry whose name swaps the trailing ``weight`` for ``bias``. Raises ``ValueError``
    if the update holds no such layer. FedAvg deltas are negated into descent directions.
    """
    if update.update is None:
        raise ValueError("the client sent no update")
    k = update.task.num_classes
    sign = -1.0 if update.task.protocol == "fedavg" else 1.0
    found = [
        (n, torch.as_tensor(v))
        for n, v in update.update.items()
        if torch.as_tensor(v).dim() == 2 and v.shape[0] == k and torch.as_tensor(v).is_floating_point()
    ]
    if not found:
        raise ValueError(f"the update has no classifier weight of shape ({k}, d)")
    name, weight = found[-1]
    bias = None
    if name.endswith("weight"):
        b = update.update.get(name[: -len("weight")] + "bias")
        if b is not None and tuple(b.shape) == (k,):
            bias = sign * torch.as_tensor(b).detach().double()
    p = None if probs is None else probs.detach().double().cpu()
    return LastLayer(sign * weight.detach().double(), bias, p)


@torch.no_grad()
def expected_probs(model: nn.Module, input_shape: tuple[int, ...], size: int = PROBE_SIZE) -> Tensor:
    """Mean softmax of ``model`` over ``size`` standard-normal probe inputs (normalized space).

    Estimates ``pbar_c = mean_i p_ic`` without data: an untrained or early model's predictions depend
    little on its input, but much on the class (its classifier bias and weights). The model runs in
    its current mode (attacker mode: BatchNorm on batch statistics); buffers are restored afterwards.
    The probe comes from a fixed generator, so the estimate is deterministic.
    """
    device = next(model.parameters()).device
    saved = {k: v.clone() for k, v in model.named_buffers()}
    probe = torch.randn((size, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    probs = torch.softmax(model(probe).double(), dim=1).mean(dim=0).cpu()
    for k, v in model.named_buffers():
        v.copy_(saved[k])
    return probs


def _smallest(scores: Tensor, n: int) -> Tensor:
    """The n classes with the smallest scores; beyond K labels, classes repeat in that order."""
    order = torch.argsort(scores)
    return order.repeat(-(-n // len(order)))[:n]


def idlg(layer: LastLayer, num_labels: int) -> Tensor:
    """iDLG (Zhao et al., 2020): ``argmin_c sum_j dW[c, j]``, exact for B = 1 with non-negative h.

    For B > 1: the B smallest row sums (the batch extension of ``inversefed``/GIFD; distinct labels).
    """
    return torch.sort(_smallest(layer.weight.sum(dim=1), num_labels)).values


def yin(layer: LastLayer, num_labels: int) -> Tensor:
    """Yin et al. (CVPR 2021): the B classes whose weight-gradient rows have the smallest minima."""
    return torch.sort(_smallest(layer.weight.min(dim=1).values, num_labels)).values


def estimate_counts(layer: LastLayer, num_labels: int) -> Tensor:
    """Real-valued class counts ``n_hat`` (K,), from ``B * s_c = B * pbar_c - n_c``.

    ``s`` is the bias gradient (scale known) or, without a bias, the weight rows' sums (scaled by the
    unknown mean feature sum, so ``n_hat`` is normalized to sum to B over present classes, the
    "impact" of Wainakh et al.). ``pbar`` is ``layer.probs`` when given (rescaled on absent classes
    when there is no bias), else the mean of ``s`` over absent classes, whose ``s_c = pbar_c``.
    Present classes start as those with ``s_c < 0``; since a class with count 1 can still have
    ``s_c >= 0`` when ``B * pbar_c >= 1``, presence is re-estimated as ``n_hat_c >= 0.5`` until stable.
    """
    bias = layer.bias is not None
    s = layer.bias if layer.bias is not None else layer.weight.sum(dim=1)
    probs, b = layer.probs, float(num_labels)
    present = s < 0
    n_hat = (-b * s).clamp_min(0)
    for _ in range(len(s)):
        absent = ~present
        if not bool(absent.any()):
            pbar = probs if (probs is not None and bias) else torch.zeros_like(s)
        elif probs is not None:
            pbar = probs if bias else probs * (s[absent].sum() / probs[absent].sum().clamp_min(1e-12))
        else:
            pbar = s[absent].mean().expand_as(s)
        d = pbar - s
        total = d[present].clamp_min(0).sum()
        scale = b if bias else (b / total if total > 0 else 0.0)
        n_hat = (scale * d).clamp_min(0)
        new = (s < 0) | (n_hat >= 0.5)
        if torch.equal(new, present):
            break
        present = new
    return n_hat


def integer_counts(n_hat: Tensor, certain: Tensor, num_labels: int) -> Tensor:
    """Round ``n_hat`` to counts summing to B, keeping at least 1 for every ``certain`` class."""
    if int(certain.sum()) > num_labels:  # keep the B most certain (largest n_hat)
        keep = torch.argsort(n_hat.masked_fill(~certain, -1.0), descending=True)[:num_labels]
        certain = torch.zeros_like(certain).index_fill_(0, keep, True)
    counts = n_hat.round().long()
    counts[certain] = counts[certain].clamp_min(1)
    while int(counts.sum()) < num_labels:
        counts[torch.argmax(n_hat - counts)] += 1
    while int(counts.sum()) > num_labels:
        residual = (n_hat - counts).masked_fill(counts <= certain.long(), float("inf"))
        counts[torch.argmin(residual)] -= 1
    return counts


def bias_corrected(layer: LastLayer, num_labels: int) -> Tensor:
    """Count-aware recovery after Wainakh et al. (PoPETs 2022, "LLG+"), with an expected-softmax offset.

    Counts from :func:`estimate_counts`, rounded by :func:`integer_counts` (classes with a negative
    signal are certainly present and get at least one label).
    """
    s = layer.bias if layer.bias is not None else layer.weight.sum(dim=1)
    counts = integer_counts(estimate_counts(layer, num_labels), s < 0, num_labels)
    return torch.repeat_interleave(torch.arange(len(s)), counts)


def auto(layer: LastLayer, num_labels: int) -> Tensor:
    """iDLG for a single example without classifier bias, else the count-aware ``bias-corrected``.

    With a bias and B = 1, ``bias-corrected`` is the argmin of the bias gradient: only the true class
    has ``p - y < 0``, whatever the activation (iDLG's row sums need non-negative features).
    """
    if num_labels == 1 and layer.bias is None:
        return idlg(layer, num_labels)
    return bias_corrected(layer, num_labels)


LABEL_STRATEGIES: dict[str, Strategy] = {
    "auto": auto,
    "idlg": idlg,
    "yin": yin,
    "bias-corrected": bias_corrected,
}


def recover_labels(
    update: ClientUpdate,
    num_labels: int | None = None,
    strategy: str = "auto",
    model: nn.Module | None = None,
) -> Tensor:
    """Infer ``num_labels`` (default ``update.num_examples``) labels from the update.

    With ``model`` (the attacker's copy of the global model, see :func:`attacks.victim.victim_model`)
    the count-aware strategies use its expected softmax (:func:`expected_probs`); without it they
    use the update alone. Returns a LongTensor (num_labels,) sorted by class. Raises ``ValueError``
    for an unknown strategy or an update without a classifier layer.
    """
    if strategy not in LABEL_STRATEGIES:
        raise ValueError(f"unknown label strategy {strategy!r} (known: {', '.join(LABEL_STRATEGIES)})")
    n = int(update.num_examples if num_labels is None else num_labels)
    if n < 1:
        raise ValueError(f"cannot recover {n} labels")
    probs = None if model is None else expected_probs(model, tuple(update.task.input_shape))
    return LABEL_STRATEGIES[strategy](last_layer_gradients(update, probs), n).long()
