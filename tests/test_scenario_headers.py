"""Every command a shipped scenario's header suggests (a backquoted ``--set ...``, or ``fedsim run <file> --set
...``) validates, or is refused when the header says so: a suggestion a reader copies must not fail on a field the
header forgot (e.g. naming an attack whose params or model the scenario does not have)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedsim.errors import FedsimError
from fedsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "scenarios").rglob("*.yaml") if p.parent.name != "priors")
SNIPPET = re.compile(r"`([^`]*--set[^`]*)`(\s*\(refused)?")


def _suggestions() -> list[tuple[Path, str, Path, list[str], bool]]:
    """``(file, snippet, scenario it applies to, overrides, refused?)`` for every backquoted --set suggestion in the
    leading comment block of every shipped scenario (comment lines joined, so a snippet may wrap)."""
    out = []
    for path in SHIPPED:
        head = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            head.append(line[1:].strip())
        for match in SNIPPET.finditer(" ".join(head)):
            tokens = shlex.split(match.group(1))
            if tokens[:2] in (["fedsim", "run"], ["fedsim", "validate"]):
                target, rest = ROOT / tokens[2], tokens[3:]
            elif tokens[0] == "--set":
                target, rest = path, tokens
            else:  # a shell loop or prose around the flags: not a command to copy as is
                continue
            sets = [rest[i + 1] for i, t in enumerate(rest[:-1]) if t == "--set"]
            out.append((path, match.group(1), target, sets, bool(match.group(2))))
    return out


SUGGESTIONS = _suggestions()


def test_the_headers_suggest_commands() -> None:
    assert len(SUGGESTIONS) >= 20  # the parser finds them (28 when written)


@pytest.mark.parametrize(("path", "snippet", "target", "sets", "refused"), SUGGESTIONS,
                         ids=[f"{s[0].relative_to(ROOT)}:{s[1][:40]}" for s in SUGGESTIONS])
def test_every_suggested_command_validates(path: Path, snippet: str, target: Path, sets: list[str],
                                           refused: bool) -> None:
    if refused:  # the header shows a refusal on purpose
        with pytest.raises(FedsimError):
            load_scenario(target, sets)
    else:
        load_scenario(target, sets)
