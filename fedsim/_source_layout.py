"""Maps ``fedsim.attacks`` and ``fedsim.defenses`` to the repository's ``attacks/`` and ``defenses/`` folders.

A built wheel installs the two plug-in folders *inside* the ``fedsim`` package (``pyproject.toml``'s
``package-dir``), so nothing top-level named ``attacks`` or ``defenses`` lands in site-packages. A source
checkout keeps them beside ``fedsim/`` (the folders plug-in authors edit); there this finder resolves the
two subpackage names to those folders, whatever put the checkout on ``sys.path`` (an editable install,
``PYTHONPATH``, or running from the repository root).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PLUGIN_PACKAGES = ("attacks", "defenses")


class SourceTreePlugins(importlib.abc.MetaPathFinder):
    """Finds ``fedsim.<name>`` for ``name`` in :data:`PLUGIN_PACKAGES` in ``root/<name>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != "fedsim" or name not in PLUGIN_PACKAGES:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


class OldPluginNames(importlib.abc.MetaPathFinder):
    """The LAST finder on ``sys.meta_path``: a top-level ``attacks``/``defenses`` that no other finder found is a
    plug-in written for fedsim < 0.2, so the import fails with the migration message (:func:`old_name_error`)
    instead of a bare ``No module named 'attacks'``.

    Another project's real ``attacks`` package is never shadowed: every finder before this one (the path finder,
    editable-install finders) is asked first, and so is any finder appended after it. Submodules are left alone:
    ``attacks.x`` reaches a finder only once some ``attacks`` was imported, which is then not ours to judge.
    """

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PLUGIN_PACKAGES or path is not None:
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else []
        for finder in later:  # a finder registered after this one still wins
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        raise old_name_error(fullname)


def install(package_dir: Path) -> None:
    """Registers the finder when ``package_dir`` (``fedsim/``) lies in a source checkout (no-op in a wheel), and,
    in both, :class:`OldPluginNames` at the end of ``sys.meta_path``."""
    root = package_dir.parent
    in_checkout = all(not (package_dir / n).is_dir() and (root / n / "__init__.py").is_file() for n in PLUGIN_PACKAGES)
    if in_checkout and not any(isinstance(f, SourceTreePlugins) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceTreePlugins(root))
    if not any(isinstance(f, OldPluginNames) for f in sys.meta_path):
        sys.meta_path.append(OldPluginNames())


def old_name_error(name: str) -> ModuleNotFoundError:
    """The error a plug-in gets for importing the pre-0.2 top-level ``attacks``/``defenses`` packages: a
    :class:`ModuleNotFoundError` named ``name``, as when no such package exists (the plug-in loader,
    :mod:`fedsim.discovery`, turns it into one line naming the plug-in's file)."""
    return ModuleNotFoundError((
        f"'{name}' is no longer a top-level package: fedsim's {name} plug-ins are 'fedsim.{name}' "
        f"(write 'from fedsim.{name}.base import ...' instead of 'from {name}.base import ...'; the folder stays "
        f"{name}/)"), name=name)
