"""What the zeroth-order server received, per round: the attacks' view and the round's traffic.

:func:`build_view` copies exactly the replies the server got into a :class:`~fedsim.zo.api.ZORoundView` (clones, so
nothing the server does later changes it); the objective (ground truth) is never an argument here.
:class:`RoundTraffic` counts the round's queries (all clients, all phases: local steps, safeguard values, refresh
and, in round 0, the initial queries, as each client reported them) and uplink floats (the numbers clients sent:
``x_{i,r}`` and payload in phase 1, one value per safeguard reply, ``nu_i`` plus ``y_min``, ``y_max`` per refresh).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor

from fedsim.simulation import keys
from fedsim.zo.api import GlobalSurrogate, RFFMessage, ZORoundView

QUERIES = "zo.queries"  # the reply metric: points of f_i the client evaluated while answering (client_app.QUERIES)


@dataclass
class RoundTraffic:
    """One round's counts: ``queries`` (points of the clients' f_i evaluated, all clients and phases), ``uplink``
    (floats sent by the clients) and whether the safeguard kept ``x_r`` (``safeguard_kept``)."""

    round: int
    queries: int = 0
    uplink: int = 0
    safeguard_kept: bool = False

    def add(self, replies: dict[int, Message], floats_per_reply: int | None = 0,
            arrays: Iterable[str] = ()) -> None:
        """Count one exchange: each reply's reported queries, ``floats_per_reply`` scalars and the elements of its
        array records named in ``arrays``."""
        names = tuple(arrays)
        for reply in replies.values():
            self.queries += int(reply.content[keys.METRICS][QUERIES])
            self.uplink += int(floats_per_reply or 0)
            for name in names:
                if name in reply.content.array_records:
                    self.uplink += sum(int(a.numpy().size) for a in reply.content.array_records[name].values())


def _clone(t: Tensor) -> Tensor:
    return t.detach().cpu().clone()


def build_view(round_num: int, x_r: Tensor, x_next: Tensor, *, local: dict[int, Tensor] | None = None,
               payload: dict[int, dict[str, Tensor]] | None = None, values: dict[int, float] | None = None,
               radius: dict[int, float] | None = None, surrogates: dict[int, RFFMessage] | None = None,
               aggregate: GlobalSurrogate | None = None, secagg: bool = False) -> ZORoundView:
    """The round's :class:`ZORoundView` from what the server received (cloned, keyed and ordered by partition id).
    ``x_next`` is the next global point (``x_r`` again when the safeguard kept it)."""
    return ZORoundView(
        round=round_num, x_r=_clone(x_r), x_next=_clone(x_next),
        local={p: _clone(v) for p, v in sorted((local or {}).items())},
        payload={p: {k: _clone(v) for k, v in d.items()} for p, d in sorted((payload or {}).items())},
        values=dict(sorted((values or {}).items())),
        radius=dict(sorted((radius or {}).items())),
        surrogates={p: RFFMessage(_clone(m.nu), float(m.y_min), float(m.y_max))
                    for p, m in sorted((surrogates or {}).items())},
        aggregate=None if aggregate is None else GlobalSurrogate(_clone(aggregate.nu), float(aggregate.offset)),
        secagg=secagg,
    )
