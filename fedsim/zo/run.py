"""``fedsim run`` for ``federation.protocol: zeroth_order``: the Flower federation, the evaluator's rows, the run
directory.

The runner builds the task instance (:func:`fedsim.zo.tasks.build_objective`) and hands the server only the public
``x0`` and weights ``w_i``; the clients rebuild the objective from the seed in their own process. After each round
the runner (the evaluator, never the server) computes the history row:

* ``round``, ``seconds``;
* ``zo_objective``: the global F at the round's resulting point x_{r+1} (round 0: F(x0)), from the objective;
* ``zo_queries_round`` / ``zo_queries``: points of the clients' f_i evaluated this round (all clients, all phases:
  local steps, safeguard values, refresh; round 0: the initial queries and f_i(x0)) / cumulated;
* ``zo_uplink_floats``: floats the clients sent this round; ``zo_safeguard_kept``: 1 when the safeguard kept x_r;
* ``zo_success`` (tasks with ``success_below``, e.g. the adversarial attack: F < 0): 1 or 0;
* in attacked rounds (``zeroth_order.attacks.every`` and the last), the scores of
  :func:`fedsim.zo.attacks.score_round` on the round's :class:`~fedsim.zo.api.ZORoundView`.

The run directory is written by :func:`fedsim.report.writer.write_run_dir` (``outcomes`` empty: the zeroth-order
attacks' scores are in the rows), with ``extra["zeroth_order"]`` holding the method, task, totals and final point.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedsim.errors import SimulationError
from fedsim.report.writer import check_run_dir, write_run_dir
from fedsim.run import RunResult, default_out_dir
from fedsim.scenario import Scenario
from fedsim.simulation.ray_backend import quiet_environment
from fedsim.simulation.server_app import RoundCallback
from fedsim.zo.api import FederatedObjective, ZORoundView
from fedsim.zo.capture import RoundTraffic
from fedsim.zo.client_app import build_zo_client_app, secagg_note
from fedsim.zo.report import OBJECTIVE, QUERIES, QUERIES_ROUND
from fedsim.zo.server_app import ZOOutcome, build_zo_server_app
from fedsim.zo.tasks import build_objective

UPLINK, KEPT, SUCCESS = "zo_uplink_floats", "zo_safeguard_kept", "zo_success"


def attacked_rounds(scenario: Scenario) -> set[int]:
    """Rounds whose messages the curious server attacks: every ``attacks.every``-th round and the last."""
    spec, rounds = scenario.zeroth_order, scenario.federation.rounds
    if spec is None or not (spec.attacks.function_extraction or spec.attacks.label_set):
        return set()
    return set(range(spec.attacks.every, rounds + 1, spec.attacks.every)) | {rounds}


ATTACKS_NOTE = ("zeroth-order run: the curious server's attack scores are per round in utility (zo_extraction_*, "
                "zo_label_set_*, zo_attacked_clients); the image-attack lists 'attacks' and 'leakage' do not apply "
                "and are null")


class ZORows:
    """The evaluator: one history row per round from the server's view and traffic, scored against the objective."""

    def __init__(self, scenario: Scenario, objective: FederatedObjective, on_round: RoundCallback | None) -> None:
        self.scenario, self.objective, self.on_round = scenario, objective, on_round
        self.history: list[dict[str, float]] = []
        self.attacked = attacked_rounds(scenario)
        self.total = 0
        self.attack_seconds = 0.0  # the curious server's attacks and their scoring (timing.attacks_s)
        self.start = time.perf_counter()
        self._basis: Any = None

    def basis(self) -> Any:
        """The RFF basis shared by seed (spec §11.3): public, so the attacker builds it too."""
        if self._basis is None:
            from fedsim.zo.rff import shared_basis

            f = self.scenario.zeroth_order.fzoos
            self._basis = shared_basis(self.objective.dim, f.rff_features, f.rff_lengthscale, self.scenario.seed)
        return self._basis

    def __call__(self, view: ZORoundView, traffic: RoundTraffic) -> None:
        self.total += traffic.queries
        value = self.objective.value(view.x_next)
        row: dict[str, float] = {"round": view.round, "seconds": time.perf_counter() - self.start, OBJECTIVE: value,
                                 QUERIES_ROUND: traffic.queries, QUERIES: self.total, UPLINK: traffic.uplink}
        if view.round > 0 and self.scenario.zeroth_order.safeguard == "message":
            row[KEPT] = int(traffic.safeguard_kept)
        if self.objective.success_below is not None:
            row[SUCCESS] = int(value < self.objective.success_below)
        if view.round in self.attacked:
            from fedsim.zo.attacks import score_round

            atk = self.scenario.zeroth_order.attacks
            began = time.perf_counter()
            row.update(score_round(view, self.basis(), self.objective, heldout=atk.heldout_points,
                                   seed=self.scenario.seed, extraction=atk.function_extraction,
                                   label_set=atk.label_set))
            self.attack_seconds += time.perf_counter() - began
        self.history.append(row)
        if self.on_round is not None:
            self.on_round(view.round, row)


def run_zo_federation(scenario: Scenario, objective: FederatedObjective, on_round: ZORows | None = None,
                      verbose: bool = False, backend: str | None = None, **app_options: Any) -> ZOOutcome:
    """Run the Flower federation of a zeroth-order scenario on ``backend`` (default ``scenario.backend.kind``);
    ``app_options`` go to :func:`~fedsim.zo.client_app.build_zo_client_app` (tests: a fake objective or client).
    Raises :class:`~fedsim.errors.SimulationError` when a client fails."""
    spec, fed = scenario.zeroth_order, scenario.federation
    outcome = ZOOutcome()
    server_app = build_zo_server_app(spec, fed.clients, fed.rounds, objective.x0, list(objective.weights), outcome,
                                     on_round)
    client_app = build_zo_client_app(spec, fed.clients, scenario.seed, **app_options)
    quiet_environment(verbose)
    if (backend or scenario.backend.kind) == "inprocess":
        from fedsim.simulation.inprocess import run_inprocess

        run_inprocess(server_app, client_app, fed.clients)
    else:
        from fedsim.simulation.ray_backend import run_ray

        run_ray(server_app, client_app, fed.clients, scenario.backend, verbose)
    if len(outcome.views) != fed.rounds + 1:  # the ServerApp thread died (Flower logs it and returns)
        raise SimulationError(f"the zeroth-order federation stopped after {len(outcome.views) - 1} of {fed.rounds} "
                              "rounds (run with -v for Flower's log)")
    return outcome


def run_zo_scenario(scenario: Scenario, out_dir: Path | None = None, *, write: bool = True, verbose: bool = False,
                    on_round: RoundCallback | None = None, backend: str | None = None,
                    overwrite: bool = False) -> RunResult:
    """``fedsim run`` of a validated zeroth-order scenario (the arguments of :func:`fedsim.run.run_scenario`)."""
    start = time.perf_counter()
    target = (out_dir or default_out_dir(scenario)) if write else None
    if target is not None:
        check_run_dir(target, overwrite)  # refuse now, not after the federation
    spec = scenario.zeroth_order
    objective = build_objective(spec, scenario.federation.clients, scenario.seed)
    rows = ZORows(scenario, objective, on_round)
    try:
        outcome, error = run_zo_federation(scenario, objective, rows, verbose=verbose, backend=backend), None
    except SimulationError as err:  # a client failed: keep the finished rounds, with the failure in every output
        if not rows.history or not write:
            raise
        outcome, error = None, err
    total = round(time.perf_counter() - start, 3)
    attacks = round(rows.attack_seconds, 3)
    timing = {"federation_s": round(total - attacks, 3), "attacks_s": attacks, "total_s": total}
    history = rows.history
    failures = [] if error is None else [getattr(error, "failure", None) or
                                         {"round": len(history), "client": -1, "reason": str(error)}]
    extra: dict[str, Any] = {
        "client_failures": failures,
        "attacks": None, "leakage": None,  # the image-attack lists: not used here, see attacks_note
        "attacks_note": ATTACKS_NOTE,
        "zeroth_order": {
            "method": spec.method, "task": spec.task.family, "dim": objective.dim,
            "clients": scenario.federation.clients, "safeguard": spec.safeguard, "defenses": spec.defenses.model_dump(),
            "queries_total": rows.total, "objective_first": history[0][OBJECTIVE],
            "objective_last": history[-1][OBJECTIVE],
            "final_x": None if outcome is None else [float(v) for v in outcome.final_x],
            "secagg_note": secagg_note(spec.safeguard) if spec.defenses.secagg else None,
            "run_error": None if error is None else f"the run stopped after round {len(history) - 1}: {error}",
        }}
    written = None
    if write:
        written = write_run_dir(target, scenario, history, [], timing, extra=extra, overwrite=overwrite)
    if error is not None:
        raise SimulationError(f"{error}; the {len(history) - 1} finished round(s) are in {written} (metrics.json, "
                              "summary.md, report.html)") from None
    return RunResult(written, history, [], timing, {}, [])
