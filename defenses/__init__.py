"""Defense plug-ins: one family per file, each registered by name with ``@register_defense``."""

from defenses.base import DEFENSES, Defense, DefenseParams, UpdateContext, build_defenses, register_defense
from fedsim.discovery import import_submodules

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["DEFENSES", "Defense", "DefenseParams", "UpdateContext", "build_defenses", "register_defense"]
