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

Preconditions (:func:`label_rule_problem`, checked at validation against the built model by
:meth:`fedsim.attacks.base.Attack.check_model`): ``idlg`` and ``yin`` read the weight rows, whose sign says
"in the batch" only when the classifier's input ``h`` is non-negative, and they return distinct
classes, so a batch of more examples than classes defeats them; ``bias-corrected`` and ``auto`` read
the bias gradient, which needs no sign of ``h``, but fall back to the weight rows when the classifier
has no bias. Whether ``h >= 0`` is read off the model's structure (:func:`classifier_input`: the
module that feeds the final linear layer), never off its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsim.models import MaskDropout
from fedsim.threat import ClientUpdate

PROBE_SIZE = 16

#: Modules whose output is >= 0 for every input.
NON_NEGATIVE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.Softmax)
#: Modules that keep a non-negative input non-negative (reshaping, pooling, dropout's rescaled masks).
SIGN_KEEPING: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, MaskDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
#: Rules that read the weight rows whatever the classifier (and return distinct classes).
ROW_RULES = ("idlg", "yin")
#: Why no rule reads a gradient difference (DIFF2): for ``z = W h + b`` the bias entry of
#: ``grad l(x_r) - grad l(x_{r-1})`` is ``(1/B) sum_i (p_i(x_r) - p_i(x_{r-1}))``, in which the one-hot
#: labels cancel exactly, and the weight rows keep the labels only through the change of the features,
#: ``-y_i (h_i(x_r) - h_i(x_{r-1}))``, whose sign is arbitrary. (A restart round's clipped mean gradient
#: keeps the signs, so the sign rules still hold there; per-sample clipping reweights the examples,
#: which biases the count estimates of ``auto``/``bias-corrected`` when it is active.)
DIFFERENCE_LABELS = ("labels cannot be inferred from a gradient difference (DIFF2 difference round): the labels "
                     "cancel from its last-layer bias entry; grant knowledge.labels: known, or attack a restart round")


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
    if the update holds no such layer, or if it is a gradient difference (``update.reference_state``
    set, DIFF2's difference rounds), which no rule here can read (see :data:`DIFFERENCE_LABELS`).
    FedAvg deltas are negated into descent directions.
    """
    if update.update is None:
        raise ValueError("the client sent no update")
    if update.reference_state is not None:
        raise ValueError(DIFFERENCE_LABELS)
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


@dataclass(frozen=True)
class ClassifierInput:
    """What feeds a model's final linear layer ``name`` (the last ``nn.Linear`` its forward pass runs).

    ``feeding`` is the type of the module whose output reaches it (reshaping, pooling and dropout
    skipped; ``"the input"`` when none) and ``source`` that module's name; ``nonnegative`` holds when
    that module is one of :data:`NON_NEGATIVE` and the classifier saw no negative value on probe inputs.
    """

    name: str
    has_bias: bool
    feeding: str
    source: str
    nonnegative: bool


@torch.no_grad()
def classifier_input(model: nn.Module, input_shape: tuple[int, ...], size: int = PROBE_SIZE) -> ClassifierInput:
    """Trace one forward pass of a copy of ``model`` (eval mode, ``size`` standard-normal probe inputs of
    ``input_shape``, RNG forked) and report what feeds its final linear layer (:class:`ClassifierInput`).

    Raises ``ValueError`` when the forward pass runs no ``nn.Linear``.
    """
    import copy

    probe_model = copy.deepcopy(model).eval()
    calls: list[tuple[str, nn.Module, float]] = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple, _output: Tensor) -> None:
            first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            calls.append((name, module, float(first.min()) if first is not None and first.numel() else 0.0))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probe_model.named_modules() if not list(m.children())]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            device = next(probe_model.parameters()).device
            probe_model(torch.randn((size, *input_shape)).to(device))
    finally:
        for handle in handles:
            handle.remove()
    linear = [i for i, (_, m, _) in enumerate(calls) if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} runs no nn.Linear classifier")
    at = linear[-1]
    name, fc, seen_min = calls[at]
    feeding, source = "the input", ""
    for prev_name, prev, _ in reversed(calls[:at]):
        if not isinstance(prev, SIGN_KEEPING):
            feeding, source = type(prev).__name__, prev_name
            break
    structural = source != "" and isinstance(dict(probe_model.named_modules())[source], NON_NEGATIVE)
    return ClassifierInput(name, fc.bias is not None, feeding, source, structural and seen_min >= 0.0)


def label_rule_problem(strategy: str, classifier: ClassifierInput, num_labels: int, num_classes: int) -> str | None:
    """Why ``strategy`` cannot be trusted on this classifier for batches of at least ``num_labels``
    examples out of ``num_classes`` classes, or ``None`` (see the module docstring)."""
    if strategy not in LABEL_STRATEGIES:
        return f"unknown label strategy {strategy!r}"
    reads_rows = strategy in ROW_RULES or not classifier.has_bias
    if reads_rows and not classifier.nonnegative:
        where = f" ({classifier.source!r})" if classifier.source else ""
        rows = "its rule reads" if strategy in ROW_RULES else "without a classifier bias it reads"
        return (f"label_strategy {strategy!r}: {rows} the signs of the last layer's weight gradient, which "
                f"name the batch's classes only when the classifier's input is non-negative, but the final "
                f"linear layer {classifier.name!r} is fed by {classifier.feeding}{where}, which can be "
                f"negative; use 'auto' or 'bias-corrected' (bias gradient), or grant knowledge.labels: known")
    if strategy in ROW_RULES and num_labels > num_classes:
        return (f"label_strategy {strategy!r} returns distinct classes, but updates cover at least "
                f"{num_labels} examples of {num_classes} classes, so some class repeats; use 'auto' "
                f"(counts repeated labels)")
    return None


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

    With ``model`` (the attacker's copy of the global model, see :func:`fedsim.attacks.victim.victim_model`)
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
