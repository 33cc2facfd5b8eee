"""How an attack outcome's ``failed`` reason reads wherever outcomes are printed or counted.

A targeted (round, client) with no update to attack (the client was not sampled in that round, or sent
nothing) is recorded by :func:`fedsim.attacking.not_attacked` with a reason starting :data:`NOT_ATTACKED`. It is
"not attacked", counted and shown as such, never as a failure of the attack; a client that failed, or an attack
that raised, is a failure. An attack stopped by ``budget.time_limit_s`` ran and is scored, but every output marks it
(:func:`time_limit_note`): its numbers depend on wall time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

NOT_ATTACKED = "not attacked: "


def was_not_attacked(failed: object) -> bool:
    """Whether an outcome's ``failed`` reason says its target had no update to attack."""
    return isinstance(failed, str) and failed.startswith(NOT_ATTACKED)


def outcome_label(failed: str) -> str:
    """``not attacked: <why>`` for a target without an update, else ``failed (<why>)``."""
    return failed if was_not_attacked(failed) else f"failed ({failed})"


def time_limit_note(stats: object) -> str | None:
    """``time-limited: budget.time_limit_s stopped it after N iteration(s)`` when an attack that ran was stopped by its
    wall-time limit (its ``stats["time_limited"]`` is 1: :class:`fedsim.attacks.restarts.RestartBook` and the
    attacks' own loops set it), else None. N is the kept restart's ``iterations`` (and ``iterations_spent`` over all
    restarts when the schedule records it). Such a result depends on wall time (machine load, serial vs ray)."""
    if not isinstance(stats, Mapping) or not stats.get("time_limited"):
        return None
    done, spent = stats.get("iterations"), stats.get("iterations_spent")
    after = f" after {done:.0f} iteration(s)" if isinstance(done, int | float) else ""
    if isinstance(spent, int | float) and spent != done:
        after += f" ({spent:.0f} over all restarts)"
    return f"time-limited: budget.time_limit_s stopped it{after}; the result depends on wall time"


def time_limited_count(outcomes: Iterable[Mapping[str, Any]]) -> int:
    """How many of ``outcomes`` (metrics.json ``attacks`` records) ran, did not fail, and hit their time limit."""
    return sum(1 for o in outcomes if not o.get("failed") and time_limit_note(o.get("stats")) is not None)
