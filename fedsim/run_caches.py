"""Caches that live for one run, so a run's wall time never depends on which runs came before it in the process.

A plug-in memoises an expensive pure computation (DP-SGD's target-epsilon -> sigma solve: 1-7 s of Opacus
bisection) with :func:`per_run_cache` instead of :func:`functools.lru_cache`: the clients of one run still
share it, but :func:`clear_run_caches`, called at the start of each benchmark cell
(:func:`fedsim.bench.cell.run_cell`), makes every cell pay it alike. With a process-wide cache the first cell per
(target, sampling rate) in a serial bench or a reused Ray worker paid the solve and later cells of other methods
got it free, which skewed the DP frontier's time column (DP-SAT read 0.12-0.34x DP-SGD).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_CACHES: list[Any] = []


def per_run_cache(fn: F) -> F:
    """``functools.lru_cache(maxsize=64)`` of ``fn`` (hashable arguments), emptied by :func:`clear_run_caches`."""
    cached = lru_cache(maxsize=64)(fn)
    _CACHES.append(cached)
    return cached  # type: ignore[return-value]


def clear_run_caches() -> None:
    """Empty every :func:`per_run_cache` (call before a run whose wall time is measured)."""
    for cached in _CACHES:
        cached.cache_clear()
