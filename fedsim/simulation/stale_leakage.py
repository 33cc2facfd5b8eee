"""The privacy price of the server's GI conversion (issue 13, item 3): every estimate of a client's data the
``gi_conversion`` rule made is a reconstruction, scored here against that client's real data.

This is the evaluator's side: it alone reads the client's partition (:meth:`FederationSetup.client_data`); the
rule (:mod:`fedsim.simulation.stale_gi`) only hands over its :class:`EstimateRecord`. The estimate is a
*distribution* of ``N`` inputs, not the client's ``n`` examples one for one. Each measure is computed by ONE
function, :func:`image_scores`, for the estimate and for every trivial guess alike:

* ``psnr``: mean over the N images of the PSNR (dB, pixels in [0, 1]) to the nearest of the client's images
  (:func:`fedsim.metrics.matching.mse_matrix`); ``psnr_best``: the best image's. On MNIST this is dominated by the
  black background: an all-black image scores ~14.6 dB against a class-5 client;
* ``psnr_matched`` / ``ssim_matched``: the N images paired one-to-one with N distinct client images by the
  evaluator's optimal assignment on MSE (:func:`fedsim.metrics.matching.match_batches`, as the attacks are
  scored), then the mean PSNR / SSIM (:func:`fedsim.metrics.image.ssim_per_image`) of the pairs. SSIM rewards
  strokes, not background: a flat image scores ~0;
* ``*_trivial``: the best score of the **trivial guesses** that never looked at the update: all black, all white,
  flat 0.5 gray, the flat dataset-mean colour, the per-pixel dataset-mean image (``guesses``, from the evaluator),
  and the server's own un-optimised starting point (``record.initial``); ``*_margin`` = estimate - trivial (> 0:
  the inversion put something of the client's data into the estimate beyond what a blind guess gets);
* ``label_acc``: the overlap ``sum_c min(p_hat_c, p_c)`` of the estimates' label shares (argmax of the soft labels)
  with the client's (1 when the shares match); ``label_trivial``: the best overlap of a label guess that never
  looked at the update (uniform over the classes, or the whole training set's shares).

A failed inversion (non-finite loss or estimate: ``record.failed``) is not scored: it is counted as
``gi_failed`` and its estimate is never reported as a privacy price.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedsim.metrics.image import psnr_from_mse, psnr_per_image, ssim_per_image
from fedsim.metrics.labels import as_label_array
from fedsim.metrics.matching import match_batches, mse_matrix
from fedsim.simulation.stale_gi import EstimateRecord

ClientData = Callable[[int], tuple[Tensor, Tensor]]  # partition id -> (inputs in pixel space, labels)
IMAGE_KEYS = ("psnr", "psnr_best", "psnr_matched", "ssim_matched")
MARGIN_KEYS = ("psnr", "psnr_matched", "ssim_matched")


def image_scores(images: Tensor, inputs: Tensor) -> dict[str, float]:
    """The image measures (module docstring) of ``images`` (N, C, H, W) in [0, 1] against the client's ``inputs``
    (n, C, H, W) in [0, 1]; used for the estimate and every trivial guess alike."""
    nearest = mse_matrix(images, inputs).min(dim=1).values
    psnrs = [psnr_from_mse(float(m)) for m in nearest]
    order = match_batches(images, inputs)  # for each client image, its estimate or -1
    truth_idx = [i for i, j in enumerate(order) if j >= 0]
    paired = images[[int(order[i]) for i in truth_idx]].float()
    truth = inputs[truth_idx].float()
    out = {"psnr": sum(psnrs) / len(psnrs), "psnr_best": max(psnrs),
           "psnr_matched": float(psnr_per_image(paired, truth).double().mean()), "ssim_matched": float("nan")}
    if min(inputs.shape[-2:]) >= 3:
        out["ssim_matched"] = float(ssim_per_image(paired, truth).double().mean())
    return out


def trivial_guesses(n: int, shape: Sequence[int], mean_image: Tensor | None) -> dict[str, Tensor]:
    """The blind guesses as ``n`` images of ``shape`` (C, H, W): black, white, flat 0.5 gray and, given the
    per-pixel dataset-mean image ``mean_image`` (C, H, W), the flat dataset-mean colour and that image."""
    out = {name: torch.full((n, *shape), v) for name, v in (("black", 0.0), ("white", 1.0), ("gray", 0.5))}
    if mean_image is not None:
        colour = mean_image.float().flatten(1).mean(dim=1).view(-1, 1, 1)
        out["mean colour"] = colour.expand(*shape).unsqueeze(0).repeat(n, 1, 1, 1)
        out["mean image"] = mean_image.float().unsqueeze(0).repeat(n, 1, 1, 1)
    return out


def label_overlap(pred: Sequence[int], true: Sequence[int]) -> float:
    """``sum_c min(p_hat_c, p_c)`` of two label multisets' shares (0 when either is empty)."""
    p, t = Counter(pred), Counter(true)
    n_p, n_t = sum(p.values()), sum(t.values())
    return sum(min(p[c] / n_p, k / n_t) for c, k in t.items()) if n_p and n_t else 0.0


def score_estimate(record: EstimateRecord, inputs: Tensor, labels: Tensor, mean_image: Tensor | None = None,
                   class_shares: Mapping[int, float] | None = None) -> dict[str, float]:
    """Leakage of one (successful) estimate against the client's ``inputs`` (n, C, H, W) in [0, 1] and ``labels``
    (n,), beside the best trivial guess (module docstring); image keys only for images. ``mean_image``: the
    per-pixel training-set mean (C, H, W); ``class_shares``: the training set's label shares."""
    out: dict[str, float] = {}
    if inputs.dim() == 4 and record.pixels.dim() == 4 and len(inputs):
        out.update(image_scores(record.pixels, inputs))
        guesses = trivial_guesses(len(record.pixels), inputs.shape[1:], mean_image)
        if record.initial is not None and record.initial.shape == record.pixels.shape:
            guesses["server's start"] = record.initial
        blind = [image_scores(g, inputs) for g in guesses.values()]
        for key in MARGIN_KEYS:
            best = max((b[key] for b in blind if math.isfinite(b[key])), default=float("nan"))
            out[f"{key}_trivial"], out[f"{key}_margin"] = best, out[key] - best
    true = as_label_array(labels).tolist()
    out["label_acc"] = label_overlap(as_label_array(record.soft_labels).tolist(), true)
    num_classes = record.soft_labels.shape[-1]
    uniform = sum(min(1.0 / num_classes, k / len(true)) for k in Counter(true).values()) if true else 0.0
    prior = (sum(min(class_shares.get(c, 0.0), k / len(true)) for c, k in Counter(true).items())
             if class_shares and true else 0.0)
    out["label_trivial"] = max(uniform, prior)
    return out


def round_metrics(records: list[EstimateRecord], client_data: ClientData, mean_image: Tensor | None = None,
                  class_shares: Mapping[int, float] | None = None) -> dict[str, float]:
    """The history-row keys of a round's inversions: ``gi_inversions``, ``gi_failed`` (non-finite loss or
    estimate; not scored), ``gi_seconds`` (summed), and the mean over the successful ones of ``gi_lambda``,
    ``gi_loss`` (final L1), ``gi_psnr``, ``gi_psnr_best``, ``gi_psnr_matched``, ``gi_ssim_matched``, their
    ``_trivial`` and ``_margin``, ``gi_label_acc`` and ``gi_label_trivial`` (:func:`score_estimate`); empty
    without inversions."""
    if not records:
        return {}
    good = [r for r in records if not r.failed]
    row: dict[str, float] = {"gi_inversions": len(records), "gi_failed": len(records) - len(good),
                             "gi_seconds": sum(r.seconds for r in records),
                             "gi_lambda": sum(r.lam for r in records) / len(records)}
    if not good:
        return row
    row["gi_loss"] = sum(r.loss for r in good) / len(good)
    scores = [score_estimate(r, *client_data(r.partition_id), mean_image, class_shares) for r in good]
    keys = [*IMAGE_KEYS, *(f"{k}_{s}" for k in MARGIN_KEYS for s in ("trivial", "margin")), "label_acc",
            "label_trivial"]
    for key in keys:
        values = [s[key] for s in scores if key in s and math.isfinite(s[key])]
        if values:
            row[f"gi_{key}"] = sum(values) / len(values)
    return row


def run_metrics(taken: Any, setup: Any) -> dict[str, float]:
    """:func:`round_metrics` of a round's :class:`fedsim.simulation.stale_server.StaleRound` ``taken`` (the
    evaluator's ``setup`` gives the client data, the training set's mean image and label shares), plus the
    round's switch events: ``gi_switch_round`` (the configured or detected round s from which lambda_t = 0,
    in the row of the round a client first met it) and ``gi_uninverted`` (stale updates aggregated without an
    inversion because lambda_t = 0)."""
    data = setup.data
    mean_image = data.train_x.float().mean(dim=0) if data.train_x.dim() == 4 else None
    labels = as_label_array(data.train_y).tolist() if taken.records else []
    shares = {c: k / len(labels) for c, k in Counter(labels).items()} if labels else None
    row = round_metrics(taken.records, setup.client_data, mean_image, shares)
    if taken.switches:
        row["gi_switch_round"] = min(taken.switches.values())
    if taken.uninverted:
        row["gi_uninverted"] = taken.uninverted
    return row
