"""Check the shape of a run's metrics.json once, when it is loaded, so a corrupt or hand-edited file gives one
line naming the file and the field (and ``fedsim report`` exits 2 writing nothing) instead of a traceback deep
inside the report code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_NUMBER = (int, float)
_SCALAR = (int, float, str, bool, type(None))
# top-level fields the report code reads, and the JSON types each may hold (None: absent or null is fine)
_TOP: dict[str, tuple[type, ...]] = {
    "scenario": (str, type(None)), "seed": (int, type(None)), "backend": (str, type(None)),
    "utility": (list, type(None)), "attacks": (list, type(None)), "leakage": (list, dict, type(None)),
    "timing": (dict, type(None)), "client_failures": (list, type(None)), "client_metrics": (dict, type(None)),
    "privacy": (dict, type(None)), "training_diverged": (str, type(None)), "report_error": (str, type(None)),
    "zeroth_order": (dict, bool, type(None)), "threat_model": (dict, type(None)),
}
_ATTACK: dict[str, tuple[type, ...]] = {
    "attack": (str,), "attack_index": (int, type(None)), "round": (int, type(None)),
    "client": (int, str, type(None)), "failed": (str, type(None)), "oracle": (bool, type(None)),
    "metrics": (dict, type(None)), "stats": (dict, type(None)), "staleness": (int, type(None)),
    "threat_model": (str, type(None)),  # the SoK letter (absent in files written before issue 14)
    "manipulated_by": (dict, type(None)),  # {"attack_index", "attack"}: absent on an honest model's update
}


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, _NUMBER) else type(value).__name__)


def _names(types: tuple[type, ...]) -> str:
    words = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true/false", type(None): "null"}
    return " or ".join(dict.fromkeys(words[t] for t in types if not (t is float and int in types)))


def _is(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


def check_metrics(metrics: dict[str, Any], path: Path) -> None:
    """Raise ``ValueError('<path>: <field> must be ..., found ...')`` for the first malformed field of a run's
    metrics.json; return quietly when every field the report reads has its expected type."""

    def bad(field: str, want: str, value: object) -> ValueError:
        return ValueError(f"{path}: {field} must be {want}, found {_kind(value)} ({str(value)[:40]!r})")

    for key, types in _TOP.items():
        if key in metrics and not _is(metrics[key], types):
            raise bad(key, _names(types), metrics[key])
    for i, row in enumerate(metrics.get("utility") or []):
        if not isinstance(row, dict):
            raise bad(f"utility[{i}]", "an object", row)
        for key, value in row.items():
            if key == "round" and not _is(value, (int,)):
                raise bad(f"utility[{i}].round", "an integer", value)
            if key.startswith(("test_", "train_", "zo_")) and value is not None and not _is(value, (*_NUMBER, str)):
                raise bad(f"utility[{i}].{key}", "a number or null", value)
            if not _is(value, _SCALAR) and not key.startswith(("clients_", "class_")):
                raise bad(f"utility[{i}].{key}", "a number, string or null", value)
    for i, outcome in enumerate(metrics.get("attacks") or []):
        if not isinstance(outcome, dict):
            raise bad(f"attacks[{i}]", "an object", outcome)
        for key, types in _ATTACK.items():
            if key in outcome and not _is(outcome[key], types):
                raise bad(f"attacks[{i}].{key}", _names(types), outcome[key])
    for sub, value in (metrics.get("timing") or {}).items():
        if not _is(value, (*_NUMBER, type(None))):
            raise bad(f"timing.{sub}", "a number or null", value)
