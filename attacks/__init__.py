"""Attack plug-ins: one family per file, each registered by name with ``@register_attack``."""

from attacks.base import ATTACKS, Attack, AttackParams, register_attack
from fedsim.discovery import import_submodules

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["ATTACKS", "Attack", "AttackParams", "register_attack"]
