"""Configurations with every default filled in, flattened to dotted paths, so two can be diffed.

An attack's ``params`` in a scenario hold only what the file wrote; its defaults (IG's ``tv`` 0.01,
DIA's 1e-5) matter as much, so :func:`resolved_attack` validates them through the attack's ``Params``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsim.plugins import attack_registry
from fedsim.scenario import AttackSpec, Scenario


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def resolved_attack(spec: AttackSpec) -> dict[str, Any]:
    """One attack spec with its parameters' defaults filled in, flattened (``params.tv``, ``budget.iterations``)."""
    cls = attack_registry().get(spec.name)
    params = cls.Params.model_validate(spec.params).model_dump(mode="json")
    raw = spec.model_dump(mode="json")
    raw["params"] = params
    return flatten(raw)


def resolved_scenario(scenario: Scenario) -> dict[str, Any]:
    """The whole scenario flattened, each attack resolved (``attacks.0.params.tv``, ``model.dropout``)."""
    raw = scenario.model_dump(mode="json")
    raw["attacks"] = {str(i): {} for i in range(len(scenario.attacks))}
    flat = {k: v for k, v in flatten(raw).items() if not k.startswith("attacks.")}
    for i, spec in enumerate(scenario.attacks):
        flat.update({f"attacks.{i}.{k}": v for k, v in resolved_attack(spec).items()})
    return flat
