"""The privacy price of the server's GI conversion (issue 13, item 3): every estimate of a client's data the
``gi_conversion`` rule made is a reconstruction, scored here against that client's real data.

This is the evaluator's side: it alone reads the client's partition (:meth:`FederationSetup.client_data`); the
rule (:mod:`fedsim.simulation.stale_gi`) only hands over its :class:`EstimateRecord`. The estimate is a
*distribution* of ``N`` inputs, not the client's ``n`` examples one for one, so it is scored per estimate:

* ``psnr``: mean over the N estimates of the PSNR (dB, pixels in [0, 1]) to the nearest of the client's images
  (:func:`fedsim.metrics.matching.mse_matrix`); ``psnr_best``: the best estimate's; ``psnr_blind``: the same
  nearest-image PSNR of the blind guess (a uniform 0.5 gray image), the trivial attacker to compare with;
* ``label_acc``: the overlap ``sum_c min(p_hat_c, p_c)`` of the estimates' label distribution (argmax of the soft
  labels) with the client's: :func:`fedsim.metrics.labels.label_accuracy`'s multiset overlap for unequal sizes
  (1 when the shares match, e.g. every estimate labelled with a one-class client's class).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from fedsim.metrics.image import psnr_from_mse
from fedsim.metrics.labels import as_label_array
from fedsim.metrics.matching import mse_matrix
from fedsim.simulation.stale_gi import EstimateRecord

ClientData = Callable[[int], tuple[Tensor, Tensor]]  # partition id -> (inputs in pixel space, labels)


def score_estimate(record: EstimateRecord, inputs: Tensor, labels: Tensor) -> dict[str, float]:
    """Leakage of one estimate against the client's ``inputs`` (n, C, H, W) in [0, 1] and ``labels`` (n,)
    (module docstring); ``psnr*`` only for images."""
    out: dict[str, float] = {}
    if inputs.dim() == 4 and record.pixels.dim() == 4 and len(inputs):
        nearest = mse_matrix(record.pixels, inputs).min(dim=1).values
        psnrs = [psnr_from_mse(float(m)) for m in nearest]
        gray = torch.full((1, *inputs.shape[1:]), 0.5)
        out.update(psnr=sum(psnrs) / len(psnrs), psnr_best=max(psnrs),
                   psnr_blind=psnr_from_mse(float(mse_matrix(gray, inputs).min())))
    pred, true = Counter(as_label_array(record.soft_labels).tolist()), Counter(as_label_array(labels).tolist())
    n_pred, n_true = sum(pred.values()), sum(true.values())
    out["label_acc"] = (sum(min(pred[c] / n_pred, k / n_true) for c, k in true.items())
                        if n_pred and n_true else 0.0)
    return out


def round_metrics(records: list[EstimateRecord], client_data: ClientData) -> dict[str, float]:
    """The history-row keys of a round's inversions: ``gi_inversions``, ``gi_seconds`` (summed), and the mean over
    them of ``gi_lambda``, ``gi_loss`` (final L1), ``gi_psnr``, ``gi_psnr_best``, ``gi_psnr_blind``,
    ``gi_label_acc`` (:func:`score_estimate`); empty without inversions."""
    if not records:
        return {}
    scores = [score_estimate(r, *client_data(r.partition_id)) for r in records]
    row: dict[str, float] = {"gi_inversions": len(records), "gi_seconds": sum(r.seconds for r in records),
                             "gi_lambda": sum(r.lam for r in records) / len(records),
                             "gi_loss": sum(r.loss for r in records) / len(records)}
    for key in ("psnr", "psnr_best", "psnr_blind", "label_acc"):
        values = [s[key] for s in scores if key in s]
        if values:
            row[f"gi_{key}"] = sum(values) / len(values)
    return row

