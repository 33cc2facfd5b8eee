"""Build the apps for a scenario and drive them on the chosen backend."""

from __future__ import annotations

from typing import Any

from fedsim.scenario import AttackSpec, Scenario
from fedsim.simulation.capture import AGGREGATE_ID, CaptureLog
from fedsim.simulation.client_app import build_client_app
from fedsim.simulation.ray_backend import quiet_environment
from fedsim.simulation.server_app import FederationOutcome, RoundCallback, build_server_app


def attacks_model(spec: AttackSpec) -> bool:
    """Whether the attack inverts the released global model (``target = "model"``), not client updates."""
    from fedsim.plugins import attack_registry

    return getattr(attack_registry().get(spec.name), "target", "update") == "model"


def released_rounds(spec: AttackSpec, num_rounds: int) -> list[int]:
    """Rounds after which a model-inversion attack inverts the released model: ``every`` k-th, the
    ``rounds`` given, or by default the final round."""
    if spec.every is None and "rounds" not in spec.model_fields_set:
        return [num_rounds]
    return spec.target_rounds(num_rounds)


def capture_targets(scenario: Scenario) -> set[tuple[int, int]]:
    """Every (round, partition id) some update attack targets."""
    fed = scenario.federation
    return {
        (r, c)
        for atk in scenario.attacks if not attacks_model(atk)
        for r in atk.target_rounds(fed.rounds)
        for c in atk.target_clients(fed.clients)
    }


def rounds_to_release(scenario: Scenario) -> set[int]:
    """The rounds whose global model must be kept: every model attack's rounds, and always the final one."""
    rounds = scenario.federation.rounds
    return {rounds}.union(*(released_rounds(a, rounds) for a in scenario.attacks if attacks_model(a)))


def secure_aggregation(scenario: Scenario) -> Any | None:
    """The defense that asks for secure aggregation (``secure_aggregation = True``), if any."""
    from fedsim.defenses import DEFENSES

    for spec in scenario.defenses:
        cls = DEFENSES.get(spec.name)
        if getattr(cls, "secure_aggregation", False):
            return cls.Params.model_validate(spec.params)
    return None


def run_federation(scenario: Scenario, on_round: RoundCallback | None = None, verbose: bool = False,
                   backend: str | None = None) -> FederationOutcome:
    """Run the federation; ``backend`` overrides ``scenario.backend.kind`` (e.g. for comparisons)."""
    secure = secure_aggregation(scenario)
    targets = capture_targets(scenario)
    if secure is not None:  # the server can only ever see the aggregate
        from fedsim.simulation.secure import build_secure_server_app
        from fedsim.simulation.secure_client import build_secure_client_app

        targets = {(r, AGGREGATE_ID) for r, _ in targets}
    outcome = FederationOutcome(capture=CaptureLog(targets, scenario.federation.protocol),
                                released_rounds=rounds_to_release(scenario))
    if secure is not None:
        server_app = build_secure_server_app(scenario, outcome, secure, on_round)
        client_app = build_secure_client_app(scenario)
    else:
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
