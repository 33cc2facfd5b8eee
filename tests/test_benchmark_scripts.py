"""Benchmark scripts as a user meets them (QA F12 of issue 17): ``--help`` shows a whole sentence, and a benchmark
whose comparison library is optional says it is absent before loading torch or fedsim (it took 5-7 s)."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _description(path: Path) -> str | None:
    """The text argparse shows for ``ArgumentParser(description=...)``, worked out from the expression's form."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False) or ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
            for kw in node.keywords:
                if kw.arg == "description":
                    form = ast.unparse(kw.value)
                    forms = {"__doc__": "(the whole docstring).", "__doc__.splitlines()[0]": doc.splitlines()[0],
                             "__doc__.split('\\n')[0]": doc.split("\n")[0],
                             "__doc__.split('\\n\\n')[0]": doc.split("\n\n")[0]}
                    assert form in forms, f"{path.name}: description={form}: unknown form"
                    return forms[form]
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_help_shows_whole_sentences(path: Path) -> None:
    text = _description(path)
    if text is None:
        pytest.skip("no argparse")
    assert text.rstrip().endswith((".", "?", "!", ")", ":")), f"{path.name}: --help stops at {text[-40:]!r}"


OPTIONAL = [p for p in SCRIPTS if "not installed" in p.read_text()]


def test_every_optional_dependency_is_checked_with_find_spec() -> None:
    assert {p.name for p in OPTIONAL} >= {"vs_breaching.py", "vs_pfl.py"}
    for path in OPTIONAL:
        assert re.search(r'find_spec\("(\w+)"\)', path.read_text()), path.name


@pytest.mark.parametrize("path", OPTIONAL, ids=lambda p: p.name)
def test_an_absent_library_is_reported_before_torch_loads(path: Path) -> None:
    library = re.search(r'find_spec\("(\w+)"\)', path.read_text()).group(1)
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed here")
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(path)!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(path)!r}, run_name='__main__')\n"
             "except SystemExit as end:\n"
             "    assert not end.code, end.code\n"
             "print('torch loaded' if 'torch' in sys.modules or 'fedsim' in sys.modules else 'light')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "light" and "not installed" in lines[0] and len(lines) == 2, out.stdout + out.stderr
