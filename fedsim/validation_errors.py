"""One line for the first problem pydantic found in a scenario (or a bench grid, or a prior config): the YAML
path (``attacks[0].budget.iterations``) and the reason, with a union field's accepted forms named together.
Kept apart from :mod:`fedsim.scenario` so the blocks' own files and the bench/prior configs share it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fedsim.errors import ScenarioError
from fedsim.spec_base import _PathError


def format_loc(loc: tuple[Any, ...]) -> str:
    """('attacks', 0, 'budget', 'iterations') -> 'attacks[0].budget.iterations'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "none", "bytes", "list", "dict", "set", "tuple"})


#: pydantic error types whose message names a Python class ("... instance of ScheduleSpec"): a YAML author wrote
#: something that is not a block of fields there.
_CLASS_NAMING = frozenset({"model_type", "model_attributes_type", "dataclass_type", "dataclass_exact_type",
                           "is_instance_of", "is_subclass_of"})


def _message(error: Any) -> str:
    """pydantic's message for one error, with no Python class named: a block given a scalar or a list reads
    'Input should be a block of fields (name: value, ...), not 3'."""
    if error["type"] in _CLASS_NAMING:
        return f"Input should be a block of fields (name: value, ...), not {error.get('input')!r}"
    return str(error["msg"])


def _union_tag(part: Any) -> bool:
    """Is ``part`` of an error location pydantic's tag of a union member (``literal['all']``, ``list[int]``,
    ``float``, ``constrained-int`` for ``Annotated[int, Field(ge=0)]``) rather than a field name?"""
    tagged = isinstance(part, str) and part.startswith(("function-", "constrained-"))
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or tagged)


def _union_error(errors: list[Any]) -> tuple[str, str] | None:
    """A union field's errors (one per member, each located under the member's tag) as one path (the field's) and
    one reason naming every accepted form; None when the first error is not in a union."""
    loc = tuple(errors[0]["loc"])
    cut = next((i for i, part in enumerate(loc) if _union_tag(part)), None)
    if cut is None:
        return None
    forms: list[str] = []
    for e in errors:
        eloc = tuple(e["loc"])
        if eloc[:cut] != loc[:cut] or len(eloc) <= cut or not _union_tag(eloc[cut]):
            continue
        msg = _message(e).removeprefix("Value error, ").removeprefix("Input should be ")
        msg = msg if e["type"] in _CLASS_NAMING else msg.split(",")[0]
        where = format_loc(("x", *eloc[cut + 1 :]))[1:]
        form = f"{msg} (at {where.lstrip('.')})" if where else msg
        if form not in forms:
            forms.append(form)
    return format_loc(loc[:cut]), "Input should be " + " or ".join(forms)


def _first_error(err: ValidationError) -> ScenarioError:
    union = _union_error(err.errors())
    if union is not None:
        return ScenarioError(*union)
    first = err.errors()[0]
    path, reason = format_loc(tuple(first["loc"])), _message(first)
    if reason.startswith("Value error, "):
        reason = reason[len("Value error, ") :]
    if "|" in reason and isinstance(first.get("ctx", {}).get("error"), _PathError):
        sub, reason = reason.split("|", 1)
        path = f"{path}.{sub}" if path else sub  # relative to the model whose validator raised it
    if first["type"] == "extra_forbidden":
        reason = "unknown field"
    more = len(err.errors()) - 1
    return ScenarioError(path, reason + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))
