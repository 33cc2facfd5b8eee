"""Which clients a round asked for, which it aggregated, which failed and why, and when a run stops.

The policy, the same on the plain Message-API path and under SecAgg+, and on every backend:

* **Recorded.** Every training round's history row (``utility`` in metrics.json) carries
  ``clients_requested``, ``clients_aggregated`` and ``clients_failed``; every failure is kept as
  (round, client, one-line reason) in metrics.json ``client_failures``, and summary.md and
  report.html show both whenever a round aggregated fewer clients than it asked for.
* **Partial failures: the survivors are aggregated.** FedAvg and FedSGD average the replies that
  arrived (weights renormalised over them); SecAgg+ drops the failed clients and recovers their masks
  from their neighbours' key shares (its dropout tolerance), so the aggregate is the survivors'
  weighted mean and its ground truth is the survivors' batches only. An attack aimed at a client
  that failed in that round is reported as failed with the client's reason.
* **Every client refused the model: the round is recorded, the run goes on.** A client-side check
  (``Defense.inspect_model`` raising :class:`~fedsim.errors.ModelRefusedError`) refusing the model in
  every sampled client is the defense working, not a crash: the round aggregates nothing (on the plain
  path the strategy keeps the global model; under SecAgg+ the halted round leaves it as it was), its
  row has ``clients_aggregated`` 0 and ``clients_refused`` = ``clients_requested``, the attack on it
  fails with the refusal's reason, and later rounds run as usual. No update was aggregated, so no
  central-DP release or DIFF2 estimate is affected either.
* **No progress: the run stops.** A round that aggregated no client update for any other reason
  (every client failed, or under SecAgg+ too few survived for the protocol's reconstruction
  threshold, which halts the round) raises :class:`~fedsim.errors.NoProgressError` (one line with
  the client's reason; the CLI exits 2). Nothing after it could change the model, so the run writes
  nothing.
* **Strategy wrappers need every client.** When a defense wraps the server strategy (central DP),
  the first failed client stops the run with :class:`~fedsim.errors.SimulationError`: the wrapper
  calibrates its noise to the number of clients sampled, and a mean over fewer clients has a larger
  sensitivity than the epsilon it reports accounts for. So does a defense that states its own reason
  (DIFF2: its estimator sums every client's messages over rounds), on both server paths.
* **One line per error, on every backend.** :func:`client_errors_mod` (the outermost ClientApp mod on
  both paths) turns an exception in a client into an error reply whose reason is
  ``"<Type>: <message>"``; the full traceback goes to the ``fedsim`` logger at DEBUG level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from fedsim.errors import ModelRefusedError, NoProgressError, SimulationError

log = logging.getLogger("fedsim")
MAX_REASON = 300  # characters of a client's error reason kept in outputs
REFUSED = f"{ModelRefusedError.__name__}:"  # how a refusal's reason starts (client_errors_mod's "<Type>: <message>")


def is_refusal(reason: str) -> bool:
    """Whether a client's one-line failure reason is a client-side check refusing the model (ModelRefusedError)."""
    return str(reason).startswith(REFUSED)


def one_line(reason: str) -> str:
    """A client's error reason on one line: its first non-empty line (a traceback follows it), cut to
    ``MAX_REASON`` characters; Ray's ``<class ...>:<'...'>`` wrappers are kept as one joined line."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    text = " ".join(lines) if len(lines) <= 3 else lines[0]
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def client_errors_mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower ClientApp mod: an exception in the client becomes an error reply with a one-line reason."""
    try:
        return call_next(msg, ctx)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which applies the policy above
        log.debug("client failed", exc_info=True)
        reason = one_line(f"{type(exc).__name__}: {exc}")
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@dataclass(frozen=True)
class ClientFailure:
    """One client that failed in one round, with the one-line reason its reply carried."""

    round: int
    partition_id: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "client": self.partition_id, "reason": self.reason}


@dataclass
class Participation:
    """Per training round: clients requested and aggregated; every failure with its reason."""

    requested: dict[int, int] = field(default_factory=dict)
    aggregated: dict[int, int] = field(default_factory=dict)
    failures: list[ClientFailure] = field(default_factory=list)

    def fail(self, round_num: int, partition_id: int, reason: str) -> None:
        """Record a failure (once per round and client: SecAgg+ may see one client fail in several stages)."""
        if not any(f.round == round_num and f.partition_id == partition_id for f in self.failures):
            self.failures.append(ClientFailure(round_num, partition_id, one_line(reason)))

    def failed_in(self, round_num: int) -> list[ClientFailure]:
        return sorted((f for f in self.failures if f.round == round_num), key=lambda f: f.partition_id)

    def refused_in(self, round_num: int) -> list[ClientFailure]:
        """The failures of round ``round_num`` that are a client-side check refusing the model."""
        return [f for f in self.failed_in(round_num) if is_refusal(f.reason)]

    def all_refused(self, round_num: int) -> bool:
        """Whether round ``round_num`` aggregated nothing because every client it asked refused the model."""
        requested = self.requested.get(round_num, 0)
        return (bool(requested) and self.aggregated.get(round_num, 0) == 0
                and len(self.refused_in(round_num)) == requested)

    def row(self, round_num: int) -> dict[str, float]:
        """The history-row fields of a training round (empty for round 0, the initial evaluation);
        ``clients_refused`` only when a client refused the model."""
        if round_num not in self.requested:
            return {}
        row = {"clients_requested": self.requested[round_num],
               "clients_aggregated": self.aggregated.get(round_num, 0),
               "clients_failed": len(self.failed_in(round_num))}
        if refused := len(self.refused_in(round_num)):
            row["clients_refused"] = refused
        return row

    def check(self, round_num: int, needs_every_client: str | None = None, halted: str | None = None) -> None:
        """Apply the stopping rules of the module docstring to a finished round.

        ``needs_every_client``: why a defense needs every client (stop on any failure), e.g. "defense 'central_dp'
        wraps the server strategy, ..." (:func:`fedsim.simulation.server_app.needs_every_client`);
        ``halted``: why the protocol aggregated nothing, if it says (e.g. SecAgg+'s threshold).
        Returns (the run goes on) when every client refused the model (``all_refused``). Raises NoProgressError or
        SimulationError; returns when the run may go on.
        """
        failed = self.failed_in(round_num)
        requested = self.requested.get(round_num, 0)
        first = f"client {failed[0].partition_id}: {failed[0].reason}" if failed else ""
        if self.all_refused(round_num):  # the defense worked: nothing aggregated, the model unchanged, go on
            log.info("round %d: every client refused the model (%s); nothing aggregated", round_num, first)
            return
        if requested and self.aggregated.get(round_num, 0) == 0:
            why = f"{len(failed)} of {requested} clients failed" + (f"; {halted}" if halted else "")
            raise NoProgressError(f"round {round_num}: no client update was aggregated ({why})"
                                  + (f"; {first}" if first else ""))
        if failed and needs_every_client:
            raise SimulationError(f"{first} (round {round_num}); the run stops because {needs_every_client}")
