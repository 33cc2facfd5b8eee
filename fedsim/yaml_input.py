"""Reading scenario-like YAML: ``yaml.safe_load`` with one-line errors, and ``--set key.path=value`` overrides.

Shared by scenarios, bench grids and prior configs (:mod:`fedsim.scenario` re-exports the names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedsim.errors import ScenarioError


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a raw mapping (list items by existing index); ScenarioError at the failing prefix."""
    if "[" in key or "]" in key:  # 'attacks[0].rounds': list items are numbered parts of the path
        dotted = key.strip().replace("[", ".").replace("]", "")
        raise ScenarioError("--set", f"{key.strip()!r}: write list items as path parts, e.g. {dotted!r}")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ScenarioError(where, f"no list item {part!r} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ScenarioError(where, "cannot set a field inside a plain value")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML, list items by index) to a raw dict."""
    for item in overrides:
        if "=" not in item:
            raise ScenarioError("--set", f"{item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        set_dotted(raw, key, yaml.safe_load(text) if text else "")
    return raw


def read_yaml(path: str | Path, what: str = "scenario file", field: str = "") -> Any:
    """Parse a YAML file with ``yaml.safe_load``; a missing file or bad YAML is a ScenarioError at ``field``."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(field, f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ScenarioError(field, f"{path} is not valid YAML ({where}): {getattr(err, 'problem', err)}") from None
