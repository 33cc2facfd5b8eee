"""Access to the attack and defense registries without fedsim importing any specific plug-in.

The ``attacks`` and ``defenses`` packages discover their modules with ``pkgutil`` when imported,
so a new plug-in is one new file plus its ``@register`` line; fedsim only ever sees the registry.
"""

from __future__ import annotations

from typing import Any


def attack_registry() -> Any:
    import fedsim.attacks as attacks

    return attacks.ATTACKS


def defense_registry() -> Any:
    import fedsim.defenses as defenses

    return defenses.DEFENSES
