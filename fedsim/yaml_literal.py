"""String options that YAML 1.1 would read as something else.

``yaml.safe_load`` (YAML 1.1) reads a bare ``off`` / ``on`` / ``yes`` / ``no`` / ``true`` / ``false`` as a boolean,
``null`` / ``~`` as None and ``1`` / ``1e3`` as a number. A ``Literal["off", "message"]`` option written bare
(``safeguard: off``, ``--set zeroth_order.safeguard=off``) would then be refused with "Input should be 'off'".
:func:`yaml_literal` builds the Literal type with a before-validator that maps the value YAML made back to the option
string it came from, so the bare and the quoted spelling mean the same.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator


def _key(value: Any) -> tuple[type, Any]:
    return type(value), value  # True == 1 == 1.0 in a dict: keep bool, int and float apart


def yaml_readings(options: tuple[str, ...]) -> dict[tuple[type, Any], str]:
    """``{(type, value YAML 1.1 reads): option}`` for each option YAML does not read back as the same string.

    Raises ``ValueError`` when two options read as the same value (neither could be written bare)."""
    out: dict[tuple[type, Any], str] = {}
    for option in options:
        read = yaml.safe_load(option)
        if read != option or not isinstance(read, str):
            key = _key(read)
            if key in out:
                raise ValueError(f"options {out[key]!r} and {option!r} both read as {read!r} in YAML")
            out[key] = option
    return out


def yaml_literal(*options: str) -> Any:
    """``Literal[*options]`` that also accepts the value YAML 1.1 makes of a bare option (``off`` -> False ->
    ``"off"``). Use it for every string option of a scenario model (``fedsim.zo.spec``'s ``safeguard``)."""
    readings = yaml_readings(options)

    def back_to_option(value: Any) -> Any:
        if isinstance(value, str):
            return value
        try:
            return readings.get(_key(value), value)
        except TypeError:  # unhashable (a list, a mapping): let the Literal refuse it
            return value

    return Annotated[Literal[options], BeforeValidator(back_to_option)]  # type: ignore[valid-type]


def yaml_repr(value: Any) -> str:
    """``value`` as a user would write it in a scenario YAML, for messages about a field's value: ``true`` /
    ``false`` / ``null`` instead of Python's ``True`` / ``False`` / ``None``; anything else as its ``repr``
    (``'fedavg'``, ``0.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)
