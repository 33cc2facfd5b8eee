"""Did training diverge? A run whose loss became non-finite or exploded must say so wherever it reports utility
(summary.md, report.html, the CLI), instead of only an accuracy change that a diverged model can still show (a
model with loss 1e16 may still score above chance by accident)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: A loss above this multiple of its first recorded value counts as exploded.
EXPLODED = 10.0
LOSSES = (("train_loss", "train loss"), ("test_loss", "test loss"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _round(row: dict[str, Any]) -> str:
    value = row.get("round")
    return f"{value:.0f}" if _finite(value) else "?"


def divergence_note(history: Sequence[dict[str, Any]]) -> str | None:
    """One line naming how training diverged, or None when it did not.

    ``history``: the per-round rows (``round``, and ``train_loss`` / ``test_loss`` where recorded; a value that is
    None, NaN or inf counts as non-finite, as JSON may hold it as null). Diverged: a loss became non-finite, or
    rose above :data:`EXPLODED` times its first recorded (finite, positive) value at some round.
    """
    for key, label in LOSSES:
        rows = [h for h in history if key in h]
        if not rows:
            continue
        bad = next((h for h in rows if not _finite(h[key])), None)
        if bad is not None:
            value = "non-finite" if bad[key] is None else bad[key]
            return (f"training diverged: the {label} became {value} in round {_round(bad)}; the utility and attack "
                    "figures of this run describe a broken model")
        first = rows[0][key]
        peak = max(rows, key=lambda h: h[key])
        if first > 0 and peak[key] > EXPLODED * first:
            last = rows[-1]
            return (f"training diverged: the {label} rose from {first:.4g} (round {_round(rows[0])}) to "
                    f"{peak[key]:.4g} (round {_round(peak)}), over {EXPLODED:g}x its first value, and ended at "
                    f"{last[key]:.4g} (round {_round(last)}); any accuracy change is not learning")
    return None
