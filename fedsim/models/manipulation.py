"""Architecture changes a malicious server may ship with the model it sends (``ServerModel.architecture``).

A change is registered by name (``@ARCHITECTURE_CHANGES.register("imprint")``, normally in the attack file that
uses it) as ``(model, description) -> model``: it must add its modules under one new top-level name (the
description's ``"module"``, default the change's name), keep every parameter and buffer name of the agreed model,
and route the input through the added module (e.g. a forward pre-hook on the model). The client applies the
descriptions it received, in order, to the agreed model (:func:`apply_architecture`) before loading the server's
state; the server turns an update of the changed model back into one of the agreed model by dropping the added
names (:func:`agreed_part`).

The descriptions travel as one JSON string in the TRAIN message's config (``keys.ARCHITECTURE``): what a real
deployment would ship as code or an ONNX graph, and exactly what a client-side check sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from fedsim.registry import Registry

ArchitectureChange = Callable[[nn.Module, Mapping[str, Any]], nn.Module]

ARCHITECTURE_CHANGES: Registry[ArchitectureChange] = Registry("architecture change")


def added_module(description: Mapping[str, Any]) -> str:
    """The top-level module name a change adds (its state keys start with ``"<name>."``)."""
    return str(description.get("module", description["name"]))


def apply_architecture(model: nn.Module, descriptions: Sequence[Mapping[str, Any]]) -> nn.Module:
    """``model`` with every change in ``descriptions`` applied, in order. Raises ``RegistryError`` for an
    unregistered change (the attack plug-ins register theirs: :func:`fedsim.plugins.attack_registry` imports them)."""
    if descriptions:
        from fedsim.plugins import attack_registry

        attack_registry()  # importing the attack plug-ins registers their architecture changes
    for description in descriptions:
        model = ARCHITECTURE_CHANGES.get(str(description["name"]))(model, description)
    return model


def agreed_part(state: Mapping[str, Tensor], descriptions: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """``state`` without the entries the changes in ``descriptions`` added: the agreed model's part."""
    prefixes = tuple(f"{added_module(d)}." for d in descriptions)
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def encode(descriptions: Sequence[Mapping[str, Any]]) -> str:
    """The config string a TRAIN message carries (``"[]"`` for the agreed model)."""
    return json.dumps([dict(d) for d in descriptions], sort_keys=True)


def decode(text: str) -> tuple[dict[str, Any], ...]:
    """Inverse of :func:`encode`. Raises ``ValueError`` on anything but a JSON list of objects with a name."""
    value = json.loads(text or "[]")
    if not isinstance(value, list) or not all(isinstance(d, dict) and "name" in d for d in value):
        raise ValueError(f"an architecture must be a JSON list of objects with a 'name', got {text[:80]!r}")
    return tuple(value)
