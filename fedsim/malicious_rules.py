"""Which attacks make the server malicious, and what validation refuses about them (no Flower import here).

:mod:`fedsim.simulation.malicious` runs the manipulation; :func:`check_scenario` runs in
:func:`fedsim.scenario.resolve_plugins`, so ``fedsim validate`` refuses what the federation could not run:
an attack that manipulates the model (has ``manipulate``) when ``server.role`` is not ``malicious``, or whose
needed SoK letter (``threat_model_for`` with its params) is not a manipulator's (F-H: a plug-in that manipulates
must say so, or its outcomes would be filed under an eavesdropper's letter), two malicious attacks in one round
(the server sends one model), ``to_all: false`` under secure aggregation (every sampled client gets the one
model), ``federation.staleness`` (a slow client's old
model would be manipulated and restored against another honest model), and a defense whose clients send gradient
differences against the previous round's model (DIFF2: the difference of a manipulated and an honest model's
gradients has no agreed-model meaning, and its client keeps the received model as the next reference).
"""

from __future__ import annotations

from typing import Any

from fedsim.errors import ScenarioError
from fedsim.scenario import AttackSpec, Scenario


def malicious_attacks(scenario: Scenario) -> list[tuple[int, AttackSpec, Any]]:
    """``(index, spec, class)`` of every attack of the scenario that manipulates the model (has ``manipulate``)."""
    from fedsim.plugins import attack_registry

    registry = attack_registry()
    out = []
    for i, spec in enumerate(scenario.attacks):
        cls = registry.get(spec.name) if spec.name in registry else None
        if cls is not None and callable(getattr(cls, "manipulate", None)):
            out.append((i, spec, cls))
    return out


def check_scenario(scenario: Scenario) -> None:
    """Refuse what the federation cannot run with a malicious server (module doc). Raises ScenarioError."""
    from fedsim.threat_models import THREAT_MODELS, needed_letter

    attacks = malicious_attacks(scenario)
    rounds = scenario.federation.rounds
    owner: dict[int, int] = {}
    for i, spec, _ in attacks:
        if scenario.server.role != "malicious":
            raise ScenarioError("server.role", f"{scenario.server.role!r}: attacks[{i}] ({spec.name}) changes the "
                                "model the server sends, which only a malicious server does: set server.role: "
                                "malicious or remove the attack")
        letter = needed_letter(spec)
        if not THREAT_MODELS[letter].malicious:
            raise ScenarioError(f"attacks[{i}].name", f"{spec.name} changes the model the server sends but declares "
                                f"threat model {THREAT_MODELS[letter].describe()} for these params, an eavesdropper's: "
                                "its threat_model_for must return a manipulator's letter (F, G or H)")
        if scenario.federation.staleness is not None:
            raise ScenarioError("federation.staleness", f"attacks[{i}] ({spec.name}) manipulates the model the "
                                "server sends, which fedsim does not combine with stale clients: remove one")
        differences = _difference_defense(scenario)
        if differences is not None:
            raise ScenarioError(f"defenses[{differences}]", f"{scenario.defenses[differences].name} sends gradient "
                                f"differences against the model of the round before, which attacks[{i}] "
                                f"({spec.name}) replaces by a manipulated one: remove one")
        secure = _secure_defense(scenario)
        if secure is not None and spec.params.get("to_all", True) is False:
            raise ScenarioError(f"attacks[{i}].params.to_all", f"false, but {scenario.defenses[secure].name} "
                                "(secure aggregation) sends the server's one model to every sampled client: "
                                "set true or remove it")
        field = "every" if spec.every is not None else "rounds"  # the field the user set
        for r in spec.target_rounds(rounds):
            if r in owner:
                raise ScenarioError(f"attacks[{i}].{field}", f"round {r} is also manipulated by "
                                    f"attacks[{owner[r]}]; the server sends one model per round: give them "
                                    "different rounds")
            owner[r] = i


def _difference_defense(scenario: Scenario) -> int | None:
    """Index of a defense whose clients send gradient differences (``Defense.message_reference``), or None."""
    from fedsim.defenses.base import Defense
    from fedsim.plugins import defense_registry

    registry = defense_registry()
    for j, spec in enumerate(scenario.defenses):
        cls = registry.get(spec.name) if spec.name in registry else None
        if cls is not None and cls.message_reference is not Defense.message_reference:
            return j
    return None


def _secure_defense(scenario: Scenario) -> int | None:
    """Index of a defense that asks for secure aggregation (``secure_aggregation = True``), or None."""
    from fedsim.plugins import defense_registry

    registry = defense_registry()
    for j, spec in enumerate(scenario.defenses):
        cls = registry.get(spec.name) if spec.name in registry else None
        if cls is not None and getattr(cls, "secure_aggregation", False):
            return j
    return None
