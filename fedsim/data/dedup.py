"""Row-level de-duplication of token-id examples across the parts of a text dataset (issue 16).

Parts (public pretraining part, clients' train part, test part) must be disjoint at the unit the model consumes:
the (T,) token-id row, not the verse or article it was cut from. Verses and articles often share their first
T tokens, so parts disjoint by source can still hold identical rows.
"""

from __future__ import annotations

import numpy as np


def rows_not_in(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Boolean mask (N,): which rows of ``x`` (N, T) int64 equal no row of ``reference`` (M, T) int64.

    Exact equality of whole rows (every one of the T ids); deterministic. Raises ValueError when the widths
    differ."""
    if x.ndim != 2 or reference.ndim != 2 or (len(reference) and x.shape[1] != reference.shape[1]):
        raise ValueError(f"rows of width {x.shape[1:]} cannot be compared with rows of width {reference.shape[1:]}")
    seen = {row.tobytes() for row in np.ascontiguousarray(reference, dtype=np.int64)}
    return np.fromiter((row.tobytes() not in seen for row in np.ascontiguousarray(x, dtype=np.int64)),
                       dtype=bool, count=len(x))
