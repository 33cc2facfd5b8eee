"""Import every module of a plug-in package once, so their ``@register`` decorators run."""

from __future__ import annotations

import importlib
import pkgutil

from fedsim._source_layout import PLUGIN_PACKAGES, old_name_error


def import_submodules(package_name: str, package_path: list[str], skip: tuple[str, ...] = ()) -> None:
    """Imports ``package_name.<m>`` for every module ``m`` in ``package_path`` not starting with ``_``.

    Raises:
        ImportError: a plug-in imports the old top-level ``attacks``/``defenses`` packages (now
            ``fedsim.attacks``/``fedsim.defenses``); the message names the plug-in and the new import.
    """
    for info in pkgutil.iter_modules(package_path):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = f"{package_name}.{info.name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name in PLUGIN_PACKAGES or str(err.name).split(".")[0] in PLUGIN_PACKAGES:
                raise ImportError(f"plug-in {module}: {old_name_error(str(err.name).split('.')[0])}") from None
            raise
