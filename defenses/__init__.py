"""Defense plug-ins: one family per file, each registered by name with ``@register_defense``."""

if __name__ != "fedsim.defenses":  # imported by its old top-level name
    from fedsim._source_layout import old_name_error

    raise old_name_error("defenses")

from fedsim.defenses.base import DEFENSES, Defense, DefenseParams, UpdateContext, build_defenses, register_defense  # noqa: E402
from fedsim.discovery import import_submodules  # noqa: E402

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["DEFENSES", "Defense", "DefenseParams", "UpdateContext", "build_defenses", "register_defense"]
