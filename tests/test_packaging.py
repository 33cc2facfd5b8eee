"""Packaging: the plug-in folders install as fedsim.attacks / fedsim.defenses, never as top-level packages.

Expected values come from the file system (every folder with an ``__init__.py``) and from the built wheel's
own file list, not from the configuration under test.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _folders_with_init() -> set[str]:
    found = set()
    for top, prefix in (("fedsim", "fedsim"), ("attacks", "fedsim.attacks"), ("defenses", "fedsim.defenses")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((prefix, *rel)))
    return found


def test_every_package_folder_is_listed_and_none_is_top_level() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _folders_with_init()
    assert all(name == "fedsim" or name.startswith("fedsim.") for name in config["packages"])
    assert config["package-dir"] == {"fedsim.attacks": "attacks", "fedsim.defenses": "defenses"}


def test_plugins_import_under_fedsim() -> None:
    import fedsim.attacks
    import fedsim.defenses

    assert Path(fedsim.attacks.__file__).parent == ROOT / "attacks"
    assert Path(fedsim.defenses.__file__).parent == ROOT / "defenses"
    assert "inverting_gradients" in dict(fedsim.attacks.ATTACKS.items())
    assert "dp_sgd" in dict(fedsim.defenses.DEFENSES.items())
    assert "attacks" not in sys.modules and "defenses" not in sys.modules


@pytest.mark.parametrize("name", ["attacks", "defenses"])
def test_old_top_level_name_raises_a_clear_error(name: str) -> None:
    """A checkout on sys.path still has the folders; importing them by the old name must not load a second registry."""
    spec = importlib.util.spec_from_file_location(name, ROOT / name / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / name)])
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=rf"'fedsim\.{name}'.*from fedsim\.{name}\.base import"):
        spec.loader.exec_module(module)


def test_plugin_using_old_name_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed fedsim has no top-level 'attacks': the loader turns the bare ModuleNotFoundError into the fix."""
    from fedsim.discovery import import_submodules

    pkg = tmp_path / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_attack.py").write_text("from attacks.base import Attack\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    with pytest.raises(ImportError, match=r"plug-in \S*my_attack\.py \(myplugins\.my_attack\): "
                                          r"'attacks' is no longer a top-level package"):
        import_submodules("myplugins", [str(pkg)])


def test_built_wheel_has_no_top_level_attacks_or_defenses(tmp_path: Path) -> None:
    """Built from a copy of the tree in tmp_path: setuptools writes build/ and *.egg-info next to the sources and
    never deletes stale files from build/lib, so a build in the checkout could ship deleted files (and concurrent
    runs would race). The checkout's build/ must be exactly as it was."""
    source, out = tmp_path / "src", tmp_path / "wheel"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("fedsim", "attacks", "defenses"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out.mkdir()
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["build-backend"]
    build_before = _snapshot(ROOT / "build")
    # the PEP 517 hook pip calls (pip would also run the metadata hook first and take twice as long)
    subprocess.run([sys.executable, "-c", f"import sys, {backend} as b; b.build_wheel(sys.argv[1])", str(out)],
                   check=True, capture_output=True, cwd=source)
    assert _snapshot(ROOT / "build") == build_before
    (wheel,) = out.glob("fedsim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedsim"}
    for plugin in ("attacks", "defenses"):
        shipped = {n.split("/")[-1] for n in names if n.startswith(f"fedsim/{plugin}/")}
        assert shipped == {p.name for p in (ROOT / plugin).glob("*.py")}
    assert "fedsim/data/assets/text/kjv.tsv.gz" in names


def _snapshot(folder: Path) -> set[tuple[str, int]] | None:
    """Every file under ``folder`` with its mtime (ns), or None when there is no such folder."""
    if not folder.exists():
        return None
    return {(str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in (folder, *folder.rglob("*"))}
