"""Label-recovery accuracy, order-free (iDLG / Wainakh et al. style) and under the image matching."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def as_label_array(labels: Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    """Hard labels as int64 of shape (B,); soft labels / logits of shape (B, K) are argmax-ed."""
    arr = labels.detach().cpu() if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if arr.ndim == 2:
        arr = arr.argmax(dim=1)
    if arr.ndim != 1:
        raise ValueError(f"labels must have shape (B,) or (B, K), got {tuple(arr.shape)}")
    return arr.numpy().astype(np.int64)


def label_accuracy(
    pred_labels: Tensor | Sequence[int] | np.ndarray,
    true_labels: Tensor | Sequence[int] | np.ndarray,
    order: Sequence[int] | np.ndarray | None = None,
) -> dict[str, float]:
    """``label_acc`` and ``label_acc_matched``, both fractions of the B true labels.

    - ``label_acc``: multiset overlap, ``sum_c min(#pred == c, #true == c) / B``. It ignores order,
      which is how batch label recovery (iDLG, Zhao et al. 2020; Wainakh et al. 2022) is judged:
      true [1, 1, 2] and predicted [1, 2, 2] share {1, 2}, so 2/3.
    - ``label_acc_matched``: ``mean_i pred[order[i]] == true[i]``, where ``order`` is the image
      matching (:func:`fedsim.metrics.match_batches`); ``order[i] == -1`` or an index beyond the
      predictions counts as wrong. Without ``order`` the positional order is used (``order[i] = i``).
    """
    pred, true = as_label_array(pred_labels), as_label_array(true_labels)
    b = len(true)
    if b == 0:
        return {"label_acc": 0.0, "label_acc_matched": 0.0}
    pred_counts, true_counts = Counter(pred.tolist()), Counter(true.tolist())
    overlap = sum(min(n, pred_counts[c]) for c, n in true_counts.items())
    idx = np.arange(b) if order is None else np.asarray(order, dtype=np.int64)
    if idx.shape != (b,):
        raise ValueError(f"order must give one index per true label ({b}), got shape {idx.shape}")
    valid = (idx >= 0) & (idx < len(pred))
    hits = np.zeros(b, dtype=bool)
    hits[valid] = pred[idx[valid]] == true[valid]
    return {"label_acc": overlap / b, "label_acc_matched": float(hits.mean())}
