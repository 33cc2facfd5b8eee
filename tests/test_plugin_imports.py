"""A plug-in written for the old top-level ``attacks``/``defenses`` packages (QA F4 of issue 17): wherever fedsim
is installed from, importing the old names says what to write instead, and the CLI prints one line naming the
plug-in's file and exits 2 (no traceback); another project's real ``attacks`` package is never shadowed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import fedsim
from fedsim._source_layout import OldPluginNames

ROOT = Path(fedsim.__file__).resolve().parents[1]


@pytest.fixture
def off_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No checkout on sys.path (an installed or editable fedsim) and no module named attacks/defenses loaded."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    for name in ("attacks", "defenses", "myplugins"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("attacks", "defenses", "myplugins")]:
        del sys.modules[name]


@pytest.mark.parametrize("name", ["attacks", "defenses"])
def test_the_old_name_off_the_path_says_what_to_write(name: str, off_path: None) -> None:
    # the last resort: registered at the end; finders appended later (six, ...) are still asked first by it
    assert any(isinstance(f, OldPluginNames) for f in sys.meta_path)
    with pytest.raises(ModuleNotFoundError, match=rf"'{name}' is no longer a top-level package.*"
                                                  rf"from fedsim\.{name}\.base import") as err:
        importlib.import_module(f"{name}.base")
    assert err.value.name == name


def test_another_projects_attacks_package_is_imported(tmp_path: Path, off_path: None) -> None:
    (tmp_path / "attacks").mkdir()
    (tmp_path / "attacks" / "__init__.py").write_text("OURS = 'theirs'\n")
    (tmp_path / "attacks" / "sub.py").write_text("VALUE = 7\n")
    sys.path.insert(0, str(tmp_path))
    import attacks.sub  # the other project's package (and its submodule)

    assert attacks.OURS == "theirs" and attacks.sub.VALUE == 7
    with pytest.raises(ModuleNotFoundError, match=r"No module named 'attacks\.missing'"):  # its own error, not ours
        importlib.import_module("attacks.missing")


@pytest.mark.parametrize(("source", "words"), [
    ("from attacks.base import Attack\n", "'attacks' is no longer a top-level package"),
    ("import not_a_library_fedsim_knows\n", "imports 'not_a_library_fedsim_knows', which is not installed"),
])
def test_the_cli_prints_one_line_naming_the_plugin_file_and_exits_2(
        source: str, words: str, tmp_path: Path, off_path: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import fedsim.plugins
    from fedsim import cli
    from fedsim.discovery import import_submodules

    pkg = tmp_path / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_attack.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    # `fedsim list` fills the registries: here from the tmp package, as fedsim.attacks fills its own from attacks/
    monkeypatch.setattr(fedsim.plugins, "attack_registry", lambda: import_submodules("myplugins", [str(pkg)]))
    monkeypatch.setattr(sys, "argv", ["fedsim", "list"])
    with pytest.raises(SystemExit) as end:
        cli.main()
    assert end.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: plug-in myplugins/my_attack.py (myplugins.my_attack)") and words in err, err
