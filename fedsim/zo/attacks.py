"""The honest-but-curious server's attacks on FZooS's messages (spec §11.6), and the evaluator's scores of them.

Threat model. The server follows the protocol and keeps what it receives (:class:`~fedsim.zo.api.ZORoundView`):
each client's RFF weights ``nu_i`` with its value range, and the shared RFF basis (Omega, b come from the public
seed, spec §11.3). From these it rebuilds client i's surrogate ``mu_i(x) = (y_max - y_min) phi(x) @ nu_i + y_min``
(:func:`fedsim.zo.rff.surrogate_value`): a copy of the client's private black box f_i, evaluable and differentiable
anywhere. Two attacks:

* **function extraction**: the server predicts f_i with mu_i. Scored (evaluator side) by R^2 against the true f_i
  at held-out points (:func:`heldout_points`).
* **label-set inference** (metric task: f_i = 1 - macro-metric of a classifier perturbed by x, on client i's data):
  raising class k's logit on every input turns correct predictions into false positives of k; for a class the
  client does *not* hold that only costs (f_i rises), for one it holds it also recovers its false negatives (f_i
  rises less or falls). The server ranks the classes by the slope of mu_i at ``x_{r+1}`` (where the client fitted)
  along the direction "raise logit k" (:func:`class_logit_directions`: +1 on output bias k and on the last layer's
  weights into logit k; the output bias alone is nearly flat at the query scale, since the classifier's margins
  are large) and predicts the ``k`` with the smallest slope (:func:`infer_label_set`). A second, message-only
  statistic reads the same slope off the phase-1 reply: the client's local Adam steps move ``x_{i,r}`` against its
  surrogate gradient (:func:`infer_label_set_from_step`). The attacker knows the task's parameter layout (which
  coordinates of x are the last layer: the architecture, public as in any FL) and how many classes a client holds
  (the split design); it never sees the data, the labels or f_i.

Under SecAgg the per-client messages in the view are the masked weighted shares as received
(``w_i (y_max - y_min) nu_i + mask``, offset ``w_i y_min + mask``, no range): the server knows the protocol, so it
reads each share divided by the public w_i as client i's surrogate (:func:`client_surrogate`), and the scores show
what is left (the aggregate, which the masks do not hide, is reported as the baseline the server still has).

Scoring (:func:`score_round`) is the only place the :class:`~fedsim.zo.api.FederatedObjective` enters: it queries
the true f_i at held-out points (not counted as the client's queries) and reads ``truth['classes']`` and
``truth['bias_slice']`` / ``truth['slices']['coefs_2']`` (the layout, which the attacker is granted). The
attack functions take only what the server has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb

import torch
from torch import Tensor

from fedsim.zo.api import FederatedObjective, GlobalSurrogate, RFFMessage, ZORoundView
from fedsim.zo.rff import RFFBasis, surrogate_grad, surrogate_value

WIDE_FACTOR = 10.0
"""The wide held-out box is ``x_{r+1} +- WIDE_FACTOR * r_i`` (clipped to [0, 1]^d): how fast extraction decays away
from where the client fitted."""

DEFAULT_RADIUS = 0.01
"""Least half-width of the fit box: the client fits its RFF on the history nearest x_{r+1}, which holds exploration
queries within the authors' exploration radius 0.01 of its trajectory (spec §11.5), even when r_i is smaller."""


# ---------------------------------------------------------------- server side: only what the server saw

def predict_values(basis: RFFBasis, surrogate: RFFMessage | GlobalSurrogate, points: Tensor) -> Tensor:
    """The server's prediction of a client's (or, for the aggregate, the global) objective at ``points`` (n, d):
    the rebuilt RFF surrogate (spec §11.3), ``(n,)`` float64."""
    return surrogate_value(basis, surrogate, points.to(torch.float64))


Span = slice | tuple[int, int]
"""A block of coordinates of x: a slice, or ``(start, stop)`` half-open as the metric task's ``truth['slices']``
(:mod:`fedsim.zo.tasks.metric`)."""


def client_surrogate(message: RFFMessage, weight: float, masked: bool) -> RFFMessage | GlobalSurrogate:
    """The server's reading of client i's message as a surrogate of f_i: the message itself, or under SecAgg the
    share divided by the client's public weight w_i (``(phi @ nu_i + offset_i) / w_i``: what f_i would be if the
    share carried no mask)."""
    if not masked:
        return message
    return GlobalSurrogate(nu=message.nu / weight, offset=message.y_min / weight)


def _span(dim: int, block: Span) -> slice:
    if not isinstance(block, slice):
        start, stop = block
        block = slice(int(start), int(stop))
    if len(range(dim)[block]) == 0:
        raise ValueError(f"coordinates {block} select nothing of a point with {dim} coordinates")
    return block


def class_logit_directions(dim: int, bias: Span, weights: Span | None = None) -> Tensor:
    """One direction per class k in x-space, ``(C, d)`` float64: "raise class k's logit for every input". It is
    ``+1`` on output bias k (``bias``, C coordinates) and, when ``weights`` is given (the last layer's ``(h, C)``
    weights, row-major as scikit-learn's ``coefs_[-1]``), ``+1`` on each of the h weights into logit k: with
    non-negative (ReLU) hidden units that raises logit k on every example. Only the architecture's layout enters.

    Raises:
        ValueError: an empty block, or a weight block whose size is not a multiple of C.
    """
    b = range(dim)[_span(dim, bias)]
    c = len(b)
    out = torch.zeros(c, dim, dtype=torch.float64)
    out[torch.arange(c), torch.tensor(list(b))] = 1.0
    if weights is not None:
        w = range(dim)[_span(dim, weights)]
        if len(w) % c:
            raise ValueError(f"last-layer weight block of {len(w)} coordinates is not (hidden, {c})")
        idx = torch.tensor(list(w)).reshape(len(w) // c, c)  # (h, C) row-major
        for k in range(c):
            out[k, idx[:, k]] = 1.0
    return out


def _smallest(scores: Tensor, size: int) -> list[int]:
    """Indices of the ``size`` smallest scores, ties broken by the lower index (deterministic)."""
    order = sorted(range(len(scores)), key=lambda k: (float(scores[k]), k))
    return sorted(order[:size])


def infer_label_set(basis: RFFBasis, message: RFFMessage | GlobalSurrogate, x: Tensor, directions: Tensor,
                    size: int) -> list[int]:
    """Which ``size`` classes client i holds, from its rebuilt surrogate: the slope of mu_i at ``x`` (d,) (the
    point it fitted around) along each class direction (``directions`` (C, d), e.g.
    :func:`class_logit_directions`); the classes along which mu_i falls most (or rises least). Returns sorted class
    indices."""
    grad = surrogate_grad(basis, message, x.to(torch.float64))
    return _smallest(directions.to(torch.float64) @ grad, size)


def infer_label_set_from_step(x_r: Tensor, x_local: Tensor, directions: Tensor, size: int) -> list[int]:
    """Which ``size`` classes client i holds, from its phase-1 reply alone: the class directions its local steps
    moved along most (``x_{i,r} - x_r``, i.e. against its surrogate's slope). Sorted class indices."""
    step = (x_local - x_r).to(torch.float64)
    return _smallest(-(directions.to(torch.float64) @ step), size)


# ---------------------------------------------------------------- evaluator side: scores against the truth

def heldout_points(center: Tensor, radius: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` points uniform in the box ``center +- radius`` intersected with [0, 1]^d, ``(n, d)`` float64. Drawn
    from a continuous distribution, so with probability one none is a point the client queried."""
    lo = (center - radius).clamp(0.0, 1.0)
    hi = (center + radius).clamp(0.0, 1.0)
    u = torch.rand(n, center.numel(), generator=generator, dtype=torch.float64)
    return lo + u * (hi - lo)


FLAT_TOL = 1e-12
"""The truth counts as constant on the held-out points when its standard deviation is below ``FLAT_TOL`` times its
largest magnitude (at least 1): R^2 is then undefined (a piecewise-constant metric in a small box)."""


def r2_score(pred: Tensor, truth: Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (``SS_tot`` around the truth's mean): 1 is a perfect
    copy, 0 the best constant, negative worse than that. NaN when the truth is constant up to :data:`FLAT_TOL`
    (undefined: rounding would otherwise give values like -1e25)."""
    truth, pred = truth.to(torch.float64), pred.to(torch.float64)
    ss_res = float(((truth - pred) ** 2).sum())
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    scale = max(1.0, float(truth.abs().max())) if truth.numel() else 1.0
    if ss_tot <= truth.numel() * (FLAT_TOL * scale) ** 2:
        return float("nan")
    return 1.0 - ss_res / ss_tot


def rmse(pred: Tensor, truth: Tensor) -> float:
    """Root mean squared error, in the objective's units (defined also where the truth is flat)."""
    return float(((pred.to(torch.float64) - truth.to(torch.float64)) ** 2).mean().sqrt())


def label_set_scores(predicted: Sequence[int], truth: Sequence[int], num_classes: int) -> tuple[float, float]:
    """(accuracy, Jaccard) of a predicted class set: accuracy is the share of the ``num_classes`` held/not-held
    decisions that are right, Jaccard ``|P & T| / |P | T|`` (1.0 when both are empty)."""
    p, t = set(predicted), set(truth)
    correct = num_classes - len(p ^ t)
    union = len(p | t)
    return correct / num_classes, (len(p & t) / union if union else 1.0)


def label_set_chance(num_classes: int, true_size: int, predicted_size: int) -> tuple[float, float]:
    """Expected (accuracy, Jaccard) of a uniformly random subset of ``predicted_size`` classes against a true set
    of ``true_size`` out of ``num_classes``, in closed form: the overlap J is hypergeometric,
    ``P(J = j) = C(K, j) C(C - K, n - j) / C(C, n)``; accuracy ``(C - K - n + 2J) / C``, Jaccard ``J / (K + n - J)``."""
    c, k, n = num_classes, true_size, predicted_size
    if not (0 <= k <= c and 0 <= n <= c):
        raise ValueError(f"label_set_chance: sizes {k}, {n} must lie in 0..{c}")
    total = comb(c, n)
    acc = jac = 0.0
    for j in range(max(0, k + n - c), min(k, n) + 1):
        p = comb(k, j) * comb(c - k, n - j) / total
        acc += p * (c - k - n + 2 * j) / c
        jac += p * (j / (k + n - j) if k + n - j else 1.0)
    return acc, jac


def _mean(values: list[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def score_round(view: ZORoundView, basis: RFFBasis, objective: FederatedObjective, *, heldout: int = 200,
                seed: int = 0, extraction: bool = True, label_set: bool = True,
                wide_factor: float = WIDE_FACTOR, min_radius: float = DEFAULT_RADIUS) -> dict[str, float]:
    """Run the server's attacks on one round's messages and score them against the truth (evaluator only).

    Extraction, per client i that sent a surrogate: R^2 and RMSE of mu_i against f_i at ``heldout`` points uniform
    in the box the client fitted its RFF in, ``x_{r+1} +- max(r_i, min_radius)``, and the R^2 in the wide box
    ``x_{r+1} +- wide_factor * max(r_i, min_radius)``; beside them two baselines the server has without the
    individual message: the aggregate surrogate mu (``_global``: all SecAgg leaves it) and the midpoint of the
    message's value range (``_midpoint``; any constant scores <= 0, the best constant exactly 0). R^2 is NaN for a
    client whose f_i is flat on the held-out points (counted in ``zo_extraction_flat_clients``, left out of the
    means). Label set (when ``truth`` has ``classes`` and ``bias_slice``; class directions from
    :func:`class_logit_directions`, with ``slices['coefs_2']`` when present): accuracy and Jaccard of
    :func:`infer_label_set` and :func:`infer_label_set_from_step` with the true set size, beside the exact chance of
    a random subset of that size (:func:`label_set_chance`). Under ``view.secagg`` (the server's own protocol) the
    messages are SecAgg shares and the attacks read each as :func:`client_surrogate` does.

    Returns a flat dict of floats: ``zo_extraction_r2/client<i>``, ``zo_extraction_r2_wide/client<i>``,
    ``zo_extraction_{r2, r2_wide, r2_global, r2_midpoint, rmse, rmse_global}_mean``, ``zo_extraction_flat_clients``,
    ``zo_label_set_accuracy/client<i>``, ``zo_label_set_accuracy_mean``, ``zo_label_set_jaccard_mean``,
    ``zo_label_set_step_accuracy_mean``, ``zo_label_set_step_jaccard_mean``, ``zo_label_set_chance``,
    ``zo_label_set_jaccard_chance``, ``zo_attacked_clients`` (clients some attack scored: extraction needs a surrogate
    message, the label set a surrogate or a local step), ``zo_is_masked`` (flag, 1: the messages were read as SecAgg
    shares). Empty dict when no attack applied (e.g. a baseline's messages on a task without classes, or both
    attacks off): a row then carries no attack keys, so no output counts attacks that did not run.
    Held-out points are drawn from a generator seeded by (seed, round, client), so the scores are deterministic.
    Raises ValueError on a view whose points do not match the objective's dimension.
    """
    if view.x_next.numel() != objective.dim:
        raise ValueError(f"score_round: view point has {view.x_next.numel()} coordinates, objective {objective.dim}")
    out: dict[str, float] = {}
    clients = sorted(view.surrogates)
    masked = view.secagg
    reading = {i: client_surrogate(view.surrogates[i], objective.weights[i], masked) for i in clients}
    attacked: set[int] = set()
    if extraction and clients:
        _extraction(view, reading, basis, objective, heldout, seed, wide_factor, min_radius, out)
        attacked |= set(clients)
    truth = objective.truth
    if label_set and "classes" in truth and "bias_slice" in truth:
        attacked |= _label_sets(view, reading, basis, truth, out)
    if not attacked:
        return {}
    return {"zo_attacked_clients": float(len(attacked)), "zo_is_masked": float(masked), **out}


def _extraction(view: ZORoundView, reading: dict[int, RFFMessage | GlobalSurrogate], basis: RFFBasis,
                objective: FederatedObjective, heldout: int, seed: int, wide_factor: float, min_radius: float,
                out: dict[str, float]) -> None:
    keys = ("r2", "r2_wide", "r2_global", "r2_midpoint", "rmse", "rmse_global")
    acc: dict[str, list[float]] = {k: [] for k in keys}
    flat = 0
    for i, mu_i in reading.items():
        msg = view.surrogates[i]
        radius = max(view.radius.get(i, 0.0), min_radius)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(view.round) * 1009 + int(i))
        pts = heldout_points(view.x_next.to(torch.float64), radius, heldout, gen)
        truth = objective.clients[i](pts).to(torch.float64)
        pred = predict_values(basis, mu_i, pts)
        score = r2_score(pred, truth)
        flat += math.isnan(score)
        out[f"zo_extraction_r2/client{i}"] = score
        acc["r2"].append(score)
        acc["rmse"].append(rmse(pred, truth))
        if view.aggregate is not None:
            glob = predict_values(basis, view.aggregate, pts)
            acc["r2_global"].append(r2_score(glob, truth))
            acc["rmse_global"].append(rmse(glob, truth))
        if not isinstance(mu_i, GlobalSurrogate):  # a SecAgg share has no range to take the midpoint of
            acc["r2_midpoint"].append(r2_score(torch.full_like(truth, (msg.y_min + msg.y_max) / 2), truth))
        wide_pts = heldout_points(view.x_next.to(torch.float64), wide_factor * radius, heldout, gen)
        wide = r2_score(predict_values(basis, mu_i, wide_pts), objective.clients[i](wide_pts).to(torch.float64))
        out[f"zo_extraction_r2_wide/client{i}"] = wide
        acc["r2_wide"].append(wide)
    for k in keys:
        if acc[k]:
            out[f"zo_extraction_{k}_mean"] = _mean(acc[k])
    out["zo_extraction_flat_clients"] = float(flat)


def _label_sets(view: ZORoundView, reading: dict[int, RFFMessage | GlobalSurrogate], basis: RFFBasis,
                truth: dict[str, object], out: dict[str, float]) -> set[int]:
    """Score the label-set attacks into ``out``; the clients attacked (a surrogate or a local step scored)."""
    classes: list[list[int]] = [list(c) for c in truth["classes"]]  # type: ignore[union-attr]
    layout = truth.get("slices") or {}
    directions = class_logit_directions(view.x_next.numel(), truth["bias_slice"],  # type: ignore[arg-type]
                                        layout.get("coefs_2"))  # type: ignore[union-attr]
    num_classes = directions.shape[0]
    acc, jac, sacc, sjac, chance, jchance = [], [], [], [], [], []
    for i, held in enumerate(classes):
        size = len(held)
        if i in reading:
            pred = infer_label_set(basis, reading[i], view.x_next, directions, size)
            a, j = label_set_scores(pred, held, num_classes)
            out[f"zo_label_set_accuracy/client{i}"] = a
            acc.append(a)
            jac.append(j)
        if i in view.local:
            pred = infer_label_set_from_step(view.x_r, view.local[i], directions, size)
            a, j = label_set_scores(pred, held, num_classes)
            sacc.append(a)
            sjac.append(j)
        if i in reading or i in view.local:
            ca, cj = label_set_chance(num_classes, size, size)
            chance.append(ca)
            jchance.append(cj)
    if not chance:
        return set()
    if acc:
        out["zo_label_set_accuracy_mean"] = _mean(acc)
        out["zo_label_set_jaccard_mean"] = _mean(jac)
    if sacc:
        out["zo_label_set_step_accuracy_mean"] = _mean(sacc)
        out["zo_label_set_step_jaccard_mean"] = _mean(sjac)
    out["zo_label_set_chance"] = _mean(chance)
    out["zo_label_set_jaccard_chance"] = _mean(jchance)
    return {i for i in range(len(classes)) if i in reading or i in view.local}
