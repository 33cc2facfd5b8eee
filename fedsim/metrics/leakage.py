"""Score one attack's :class:`Reconstruction` against the client's :class:`GroundTruth`.

The evaluator is the only reader of ``GroundTruth``. Images are first matched one-to-one to the true
batch (Hungarian, :mod:`fedsim.metrics.matching`), then scored per pair: MSE, PSNR, SSIM and LPIPS
(when available), as mean (typical leakage) and best (worst case for the client), as in breaching.

Rules, so that numbers are never flattering by construction:
- a truth image without a reconstruction (fewer images returned than the batch) is scored against
  a uniform 0.5 gray image, the blind guess, and enters every mean; the ``*_best`` values (the worst
  case for the client) come from matched pairs only, images the attack produced: the scorer's gray
  guess never sets one, and they are absent when the attack returned no image;
- an attack that ran but isolated nothing returns an empty (0, C, H, W) reconstruction (the rule in
  :class:`fedsim.threat.Reconstruction`): a measured result, scored 0/B above 40 dB with the
  blind-guess means and no ``*_best``, not a failure;
- exact recovery of a subset (what malicious-server attacks deliver: Fowl et al., ICLR 2022) is counted
  beside the means: ``num_psnr_above_40db`` true images whose matched reconstruction is above
  :data:`EXACT_PSNR_DB` (a missing one never counts) and ``frac_psnr_above_40db`` = that count over the
  batch size. The matching first maximises that count, then minimises the cost
  (:func:`fedsim.metrics.matching.assign`), so a plain MSE pairing never breaks an exact pair;
- surplus reconstructions (more images than the batch) make the matching a *selection*: the ground
  truth picks which candidates are scored. The result says so (``oracle_selection: true``,
  ``surplus_images``; the runner then labels the outcome oracle) and pays for it: every surplus
  image enters each ``*_mean`` as one blind guess (the gray image's mean score against the batch),
  so returning k candidates per example cannot beat returning the right one; likewise the fraction
  above 40 dB is divided by the batch size plus the surplus. The unpenalised values of the selected
  images stay as ``*_mean_selected`` and ``frac_psnr_above_40db_selected``. Surplus labels are treated alike:
  ``label_acc`` is divided by the number of labels returned instead of the batch size;
- a failed attack, or images of another shape than the truth, yield ``{"failed": reason, ...}``
  with no image metrics; this function never raises on attack output.

Text (token ids, :mod:`fedsim.metrics.text`): when the truth is integer token ids (B, T) or the attack returned
``tokens`` / ``token_set``, the text scorer applies the same rules (one-to-one matching on 1 - ROUGE-L, missing
sequences as the empty blind guess, surplus as oracle selection paid for); labels (a text classifier's) are then
scored under its matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fedsim.metrics.image import mse_per_image, psnr_per_image, ssim_per_image, to_unit_range
from fedsim.metrics.labels import label_accuracy
from fedsim.metrics.lpips import get_lpips
from fedsim.metrics.matching import MatchCost, assign, cost_matrix, mse_matrix
from fedsim.metrics.text import TEXT_METRIC_DIRECTIONS, score_text
from fedsim.recovery import EXACT_PSNR_DB, FRAC_EXACT_KEY, NUM_EXACT_KEY
from fedsim.threat import GroundTruth, Reconstruction

Score = dict[str, float | int | str | list]

METRIC_DIRECTIONS: dict[str, str] = {
    "psnr": "higher leaks more",
    "ssim": "higher leaks more",
    "mse": "lower leaks more",
    "lpips": "lower leaks more",
    "label_acc": "higher leaks more",
    "label_acc_matched": "higher leaks more",
    FRAC_EXACT_KEY: "higher leaks more",
    **TEXT_METRIC_DIRECTIONS,  # rouge1/2/L, exact_seq_rate, token(_set)_precision/recall
}
"""How to read each metric: which direction means the reconstruction reveals more of the data."""

BLIND_GUESS = 0.5  # pixel value of the image an unmatched truth image is scored against


def _aligned(recon: Tensor, truth: Tensor, order: np.ndarray) -> Tensor:
    """Reconstructions in truth order; a blind-guess gray image where ``order[i] == -1``."""
    out = torch.full_like(truth, BLIND_GUESS)
    hit = torch.as_tensor(order >= 0)
    if bool(hit.any()):
        out[hit] = recon[torch.as_tensor(order[order >= 0])]
    return out


def _image_metrics(aligned: Tensor, truth: Tensor, lpips: bool, known_lpips: Tensor | None = None,
                   matched: Tensor | None = None) -> Score:
    """Mean (over every truth image) and best (over the ``matched`` ones, (B,) bool, default all; no ``*_best``
    when none is) of each per-pair metric; ``known_lpips`` (B,): the pairs' LPIPS when already computed."""
    per: dict[str, Tensor] = {
        "psnr": psnr_per_image(aligned, truth),
        "ssim": ssim_per_image(aligned, truth),
        "mse": mse_per_image(aligned, truth),
    }
    scorer = get_lpips() if lpips else None
    if scorer is not None:
        per["lpips"] = known_lpips if known_lpips is not None else scorer(aligned, truth)
    out: Score = {}
    hit = torch.ones(truth.shape[0], dtype=torch.bool) if matched is None else matched
    for name, values in per.items():
        higher_leaks = METRIC_DIRECTIONS[name].startswith("higher")
        out[f"{name}_mean"] = float(values.mean())
        if bool(hit.any()):  # best of the images the attack produced, never of a blind guess
            out[f"{name}_best"] = float(values[hit].max() if higher_leaks else values[hit].min())
    out["psnr_per_image"] = [float(v) for v in per["psnr"]]
    return out


def _lpips_from_matrix(cost: np.ndarray, order: np.ndarray, truth: Tensor) -> Tensor:
    """Per truth image, the LPIPS of its matched pair read from the LPIPS matching matrix (B_r, B_t); the
    unmatched ones against the blind-guess gray, computed (so LPIPS features are not computed twice)."""
    hit = order >= 0
    out = torch.empty(len(order), dtype=torch.float32)
    out[torch.as_tensor(hit)] = torch.as_tensor(cost[order[hit], np.nonzero(hit)[0]], dtype=torch.float32)
    if not bool(hit.all()):
        miss = torch.as_tensor(~hit)
        out[miss] = get_lpips()(torch.full_like(truth[miss], BLIND_GUESS), truth[miss])
    return out


def _exact_recoveries(psnr: list, order: np.ndarray) -> Score:
    """How many true images a reconstruction recovered above :data:`EXACT_PSNR_DB`, and that share of the batch.

    ``psnr``: per truth image, in truth order; ``order``: the matching (-1: no reconstruction, never counted)."""
    hits = (np.asarray(psnr, dtype=np.float64) > EXACT_PSNR_DB) & (np.asarray(order) >= 0)
    b = len(order)
    return {NUM_EXACT_KEY: int(hits.sum()), FRAC_EXACT_KEY: float(hits.sum()) / b if b else 0.0}


def _selection_penalty(out: Score, truth: Tensor, surplus: int, lpips: bool) -> Score:
    """``*_mean`` over the batch plus ``surplus`` blind guesses; the selected means kept as ``*_mean_selected``.
    The fraction above 40 dB likewise counts each surplus image as one miss (kept unpenalised as ``*_selected``)."""
    blind = _image_metrics(torch.full_like(truth, BLIND_GUESS), truth, lpips)
    b = truth.shape[0]
    penalised: Score = {"oracle_selection": True, "surplus_images": int(surplus)}
    for key in [k for k in out if k.endswith("_mean") and k in blind]:
        penalised[f"{key}_selected"] = out[key]
        penalised[key] = (b * float(out[key]) + surplus * float(blind[key])) / (b + surplus)
    penalised[f"{FRAC_EXACT_KEY}_selected"] = out[FRAC_EXACT_KEY]
    penalised[FRAC_EXACT_KEY] = float(out[NUM_EXACT_KEY]) / (b + surplus)
    return penalised


def _label_metrics(pred: Tensor, truth: Tensor, order: np.ndarray | None) -> Score:
    """:func:`label_accuracy`, scaled by ``B / len(pred)`` (and flagged) when more labels than examples came back."""
    out: Score = dict(label_accuracy(pred, truth, order))
    n_pred, b = int(torch.as_tensor(pred).shape[0]), int(truth.shape[0])
    if n_pred > b > 0:
        for key in ("label_acc", "label_acc_matched"):
            out[f"{key}_selected"] = out[key]
            out[key] = float(out[key]) * b / n_pred
        out.update(oracle_selection=True, surplus_labels=n_pred - b)
    return out


def _shape_problem(images: Tensor, truth: Tensor) -> str | None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        return f"reconstruction is not a (B, C, H, W) tensor (shape {tuple(getattr(images, 'shape', ()))})"
    if tuple(images.shape[1:]) != tuple(truth.shape[1:]):
        return f"reconstructed images have shape {tuple(images.shape[1:])}, the data {tuple(truth.shape[1:])}"
    return None


def is_text(rec: Reconstruction, truth: GroundTruth) -> bool:
    """Whether to score as text: the truth is integer token ids (B, T), or the attack returned tokens."""
    inputs = truth.inputs
    ids = isinstance(inputs, Tensor) and inputs.ndim == 2 and not inputs.is_floating_point()
    return ids or rec.tokens is not None or rec.token_set is not None


def _score_text(rec: Reconstruction, truth: GroundTruth, public: Sequence[int] | None = None) -> Score:
    """:func:`fedsim.metrics.text.score_text` of the reconstruction, plus a classifier's labels under its matching
    (``label_acc`` and ``label_acc_matched``; a language model's labels are the tokens themselves: not scored)."""
    b = int(truth.inputs.shape[0]) if truth.inputs.ndim else 0
    if rec.failed:
        return {"failed": str(rec.failed), "batch_size": b}
    if rec.images is not None or (rec.tokens is None and rec.token_set is None and rec.labels is None):
        why = "images" if rec.images is not None else "no tokens"
        return {"failed": f"the attack returned {why}, and the client's data are token sequences", "batch_size": b}
    out = score_text(rec.tokens, rec.token_set, truth.inputs, public) if rec.tokens is not None or \
        rec.token_set is not None else {"batch_size": b}  # labels only: scored positionally below
    labels = truth.labels
    if "failed" not in out and rec.labels is not None and isinstance(labels, Tensor) and labels.ndim == 1:
        order = np.asarray(out["order"]) if "order" in out else None
        try:
            out.update(_label_metrics(rec.labels, labels, order))
        except ValueError as exc:
            out["label_error"] = str(exc)
    return out


def score_reconstruction(
    rec: Reconstruction, truth: GroundTruth, lpips: bool = True, match: MatchCost = "mse",
    public_tokens: Sequence[int] | None = None,
) -> Score:
    """Leakage metrics of one reconstruction (see the module docstring for the rules).

    Keys: ``batch_size``; with images ``psnr_/ssim_/mse_/lpips_`` ``mean`` and ``best`` (best: matched pairs
    only, absent when no image came back), ``order``
    (per truth index the matched reconstruction index, -1 if none), ``psnr_per_image`` (truth order),
    ``num_psnr_above_40db`` and ``frac_psnr_above_40db`` (:data:`EXACT_PSNR_DB`; missing images count as misses),
    ``matched_by`` and ``num_reconstructed``; with labels ``label_acc`` and ``label_acc_matched``
    (positional when there are no images). ``lpips_*`` only when LPIPS is available and wanted.
    ``match`` is the matching cost: "mse" (default, independent of LPIPS availability) or "lpips"
    (breaching's choice; falls back to "mse" when unavailable). Text (:func:`is_text`): the keys of
    :func:`fedsim.metrics.text.score_text`, plus ``label_acc*`` for a classifier's labels; ``public_tokens``:
    the public corpus's ids by frequency (:func:`fedsim.metrics.text.public_ranking`) for the update-free
    public-bag baseline (text only; None: no public corpus, no such baseline).
    """
    if match not in ("mse", "lpips"):
        raise ValueError(f"unknown matching cost {match!r}; use 'mse' or 'lpips'")
    if is_text(rec, truth):
        return _score_text(rec, truth, public_tokens)
    true_images = to_unit_range(truth.inputs)
    out: Score = {"batch_size": int(true_images.shape[0])}
    if rec.failed:
        return {"failed": str(rec.failed), **out}
    if rec.images is None and rec.labels is None:
        return {"failed": "the attack returned neither images nor labels", **out}
    order = None
    if rec.images is not None:
        problem = _shape_problem(rec.images, true_images)
        if problem:
            return {"failed": problem, **out}
        recon = to_unit_range(rec.images)
        try:
            cost, matched_by = cost_matrix(recon, true_images, match)
            mse = cost if matched_by == "mse" else mse_matrix(recon, true_images).numpy()
            exact = mse < 10.0 ** (-EXACT_PSNR_DB / 10.0)  # the pairs above EXACT_PSNR_DB
            order = assign(cost, prefer=exact)
            known = _lpips_from_matrix(cost, order, true_images) if lpips and matched_by == "lpips" else None
            out.update(_image_metrics(_aligned(recon, true_images, order), true_images, lpips, known,
                                      torch.as_tensor(order >= 0)))
            out.update(_exact_recoveries(out["psnr_per_image"], order))
            surplus = int(recon.shape[0]) - int(true_images.shape[0])
            if surplus > 0:
                out.update(_selection_penalty(out, true_images, surplus, lpips))
        except Exception as exc:  # scoring must not take the run down with it
            return {"failed": f"scoring error: {type(exc).__name__}: {exc}", **out}
        out.update(order=[int(i) for i in order], matched_by=matched_by)
        out["num_reconstructed"] = int(recon.shape[0])
    if rec.labels is not None:
        try:
            out.update(_label_metrics(rec.labels, truth.labels, order))
        except ValueError as exc:
            out["label_error"] = str(exc)
    return out
