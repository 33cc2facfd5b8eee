"""Attack plug-ins: one family per file, each registered by name with ``@register_attack``."""

if __name__ != "fedsim.attacks":  # imported by its old top-level name
    from fedsim._source_layout import old_name_error

    raise old_name_error("attacks")

from fedsim.attacks.base import ATTACKS, Attack, AttackParams, register_attack  # noqa: E402
from fedsim.discovery import import_submodules  # noqa: E402

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["ATTACKS", "Attack", "AttackParams", "register_attack"]
