"""Import every module of a plug-in package once, so their ``@register`` decorators run."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from fedsim._source_layout import PLUGIN_PACKAGES, old_name_error
from fedsim.errors import PluginImportError


def import_submodules(package_name: str, package_path: list[str], skip: tuple[str, ...] = ()) -> None:
    """Imports ``package_name.<m>`` for every module ``m`` in ``package_path`` not starting with ``_``.

    Raises:
        PluginImportError: a plug-in imports a module that does not exist: the old top-level ``attacks``/
            ``defenses`` packages (now ``fedsim.attacks``/``fedsim.defenses``), or a library that is not installed.
            One line naming the plug-in's file and the fix (the CLI prints it and exits 2).
    """
    for info in pkgutil.iter_modules(package_path):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = f"{package_name}.{info.name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            missing = str(err.name or "")
            top = missing.split(".")[0]
            if top == "fedsim" or not missing:  # fedsim's own fault: the traceback is the report
                raise
            where = f"plug-in {_file_of(info, module)} ({module})"
            if top in PLUGIN_PACKAGES:
                raise PluginImportError(f"{where}: {old_name_error(top)}") from None
            raise PluginImportError(f"{where} imports {missing!r}, which is not installed: install it, or "
                                    "remove that file") from None


def _file_of(info: pkgutil.ModuleInfo, module: str) -> str:
    """The plug-in's file, relative to the working directory when it lies below it."""
    base = Path(getattr(info.module_finder, "path", "") or ".") / info.name
    path = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
