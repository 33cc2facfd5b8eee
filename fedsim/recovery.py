"""The exact-recovery bar of the leakage scores, torch-free so report and bench readers can name its keys.

Malicious-server attacks (Robbing the Fed, Fowl et al., ICLR 2022; trap weights, Boenisch et al., EuroS&P 2023)
recover a subset of a large batch exactly and the rest not at all, so a mean PSNR hides what they deliver. The
scorer (:mod:`fedsim.metrics.leakage`) therefore also reports how many true images were recovered above
:data:`EXACT_PSNR_DB` and that share of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EXACT_PSNR_DB = 40.0
"""PSNR (dB, data range 1; MSE 1e-4) above which a true image counts as recovered: visually exact."""
NUM_EXACT_KEY = f"num_psnr_above_{EXACT_PSNR_DB:g}db"
"""metrics.json key: how many true images have a matched reconstruction above :data:`EXACT_PSNR_DB`."""
FRAC_EXACT_KEY = f"frac_psnr_above_{EXACT_PSNR_DB:g}db"
"""metrics.json key: :data:`NUM_EXACT_KEY` over the batch size (plus surplus images, each a miss)."""
EXACT_LABEL = f"> {EXACT_PSNR_DB:g} dB"
"""Column title of the fraction in summary.md, report.html and the bench tables."""


def exact_count(metrics: Mapping[str, Any]) -> str | None:
    """``40/64``: :data:`NUM_EXACT_KEY` over the denominator of :data:`FRAC_EXACT_KEY`, so the count shown beside
    the fraction always divides to it. With surplus images (each one a miss in the fraction) the denominator is
    the batch size plus the surplus, both shown: ``16/(16+4)``. ``None`` when the metrics have no count (a
    metrics.json written before issue 14)."""
    count, batch = metrics.get(NUM_EXACT_KEY), metrics.get("batch_size")
    if not isinstance(count, int):
        return None
    surplus = metrics.get("surplus_images")
    if isinstance(surplus, int) and surplus > 0 and isinstance(batch, int):
        return f"{count}/({batch}+{surplus})"
    return f"{count}/{batch if isinstance(batch, int) else '?'}"
