"""Build the apps for a scenario and drive them on the chosen backend."""

from __future__ import annotations

from fedsim.scenario import Scenario
from fedsim.simulation.capture import CaptureLog
from fedsim.simulation.client_app import build_client_app
from fedsim.simulation.ray_backend import quiet_environment
from fedsim.simulation.server_app import FederationOutcome, RoundCallback, build_server_app


def capture_targets(scenario: Scenario) -> set[tuple[int, int]]:
    """Every (round, partition id) some attack targets."""
    fed = scenario.federation
    return {
        (r, c)
        for atk in scenario.attacks
        for r in atk.target_rounds(fed.rounds)
        for c in atk.target_clients(fed.clients)
    }


def run_federation(scenario: Scenario, on_round: RoundCallback | None = None, verbose: bool = False,
                   backend: str | None = None) -> FederationOutcome:
    """Run the federation; ``backend`` overrides ``scenario.backend.kind`` (e.g. for comparisons)."""
    outcome = FederationOutcome(capture=CaptureLog(capture_targets(scenario), scenario.federation.protocol))
    server_app = build_server_app(scenario, outcome, on_round)
    client_app = build_client_app(scenario)
    kind = backend or scenario.backend.kind
    quiet_environment(verbose)
    if kind == "inprocess":
        from fedsim.simulation.inprocess import run_inprocess

        run_inprocess(server_app, client_app, scenario.federation.clients)
    else:
        from fedsim.simulation.ray_backend import run_ray

        run_ray(server_app, client_app, scenario.federation.clients, scenario.backend, verbose)
    return outcome
