"""How an attack outcome's ``failed`` reason reads wherever outcomes are printed or counted.

A targeted (round, client) with no update to attack (the client was not sampled in that round, or sent
nothing) is recorded by :func:`fedsim.attacking.not_attacked` with a reason starting :data:`NOT_ATTACKED`. It is
"not attacked", counted and shown as such, never as a failure of the attack; a client that failed, or an attack
that raised, is a failure.
"""

from __future__ import annotations

NOT_ATTACKED = "not attacked: "


def was_not_attacked(failed: object) -> bool:
    """Whether an outcome's ``failed`` reason says its target had no update to attack."""
    return isinstance(failed, str) and failed.startswith(NOT_ATTACKED)


def outcome_label(failed: str) -> str:
    """``not attacked: <why>`` for a target without an update, else ``failed (<why>)``."""
    return failed if was_not_attacked(failed) else f"failed ({failed})"
