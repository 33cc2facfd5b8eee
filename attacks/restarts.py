"""Restart bookkeeping shared by the optimisation attacks (IG, DLG/iDLG, FedAvg inversion, ...).

Independent restarts are ranked by their final matching loss alone (Geiping et al., 2020: the
attacker has no ground truth to rank by); the image returned is the BEST restart's own image, not
the last one's (the bug GIFD's reference code has in ``choose_optimal``). Diverged restarts and a
hit time limit are counted, and when no restart is usable the attack fails with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedsim.threat import Reconstruction

T = TypeVar("T")
TIME_LIMIT = "time limit"  # the ``stopped`` reason optimisers report when their deadline passed
NON_FINITE = "non-finite loss"


def past(deadline: float | None) -> bool:
    """Whether a ``time.perf_counter()`` deadline (None: no limit) has passed."""
    return deadline is not None and time.perf_counter() > deadline


@dataclass
class RestartBook(Generic[T]):
    """Keeps the lowest-scoring usable restart and counts runs, diverged restarts and time limits.

    ``pruned``: the restarts a schedule dropped before its last rung (:func:`fedsim.attacks.schedule.run_schedule`
    books them with ``candidate=False`` unless no finished restart is usable).
    """

    best_score: float = math.inf
    best_restart: int = -1
    best: T | None = None
    runs: int = 0
    errors: int = 0
    timed_out: bool = False
    pruned: set[int] = field(default_factory=set)

    def record(self, restart: int, result: T, score: float, stopped: str | None = None, *,
               candidate: bool = True) -> None:
        """Book one finished restart: ``score`` is its final matching loss, ``stopped`` why it stopped.

        ``candidate=False``: counted (runs, failed restarts, time limit) but never the best.
        """
        self.runs += 1
        self.timed_out = self.timed_out or stopped == TIME_LIMIT
        if stopped == NON_FINITE or not math.isfinite(score):
            self.errors += 1
        elif candidate and (self.best is None or score < self.best_score):
            self.best_score, self.best_restart, self.best = score, restart, result

    def time_is_up(self, deadline: float | None) -> bool:
        """Call before each restart: True (and remembered) when the deadline has passed."""
        if past(deadline):
            self.timed_out = True
        return self.timed_out

    def failure(self, seconds: float, diverged: str = "the loss became NaN/inf", **stats: float) -> Reconstruction:
        """The failed result when no restart was usable."""
        why = diverged if self.errors else "the time limit hit before any step"
        return Reconstruction.failure(f"no usable restart: {why}", seconds=seconds, restarts=float(self.runs), **stats)

    def stats(self) -> dict[str, float]:
        """The bookkeeping half of an attack's stats."""
        return {
            "grad_loss": self.best_score, "restarts": float(self.runs), "best_restart": float(self.best_restart),
            "failed_restarts": float(self.errors), "time_limited": float(self.timed_out),
        }
