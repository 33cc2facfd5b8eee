"""Strict JSON for every file fedsim writes (metrics.json, cells.jsonl, bench and report files).

Python's ``json`` writes ``NaN`` / ``Infinity`` by default, which jq, ``JSON.parse`` and most strict parsers
reject. fedsim's encoding keeps the meaning in strict JSON:

* ``+inf`` -> the string ``"inf"`` and ``-inf`` -> ``"-inf"`` (e.g. epsilon = inf: DP ran, but with sigma = 0 or
  against a server that sees un-noised messages; null would read as "no DP");
* ``nan`` -> ``null`` (not measured / undefined);
* numpy / torch scalars and arrays -> numbers and lists (``.tolist()``), anything else unknown -> ``str``.

:func:`dumps` then writes with ``allow_nan=False`` (a non-finite float that slipped through raises).
:func:`loads` / :func:`decode` turn ``"inf"`` / ``"-inf"`` back into floats wherever they occur, so readers
(report loading, the bench store, resume) see the numbers the run produced.
"""

from __future__ import annotations

import json
import math
from typing import Any

INF, NEG_INF = "inf", "-inf"


def encode(value: Any) -> Any:
    """``value`` with non-finite floats replaced per the module's encoding, recursively (dicts, lists, tuples)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return INF if value > 0 else NEG_INF
        return value
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return encode(value.tolist())
    return str(value)


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` for non-finite numbers: ``"inf"`` / ``"-inf"`` -> float, recursively."""
    if value == INF and isinstance(value, str):
        return math.inf
    if value == NEG_INF and isinstance(value, str):
        return -math.inf
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (encoded first); kwargs go to :func:`json.dumps` (e.g. ``indent``)."""
    return json.dumps(encode(value), allow_nan=False, **kwargs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def loads(text: str | bytes) -> Any:
    """Parse strict JSON written by :func:`dumps` and decode ``"inf"`` back; ``NaN`` / ``Infinity`` literals
    (an older fedsim's files) are still read as floats so old runs stay reportable."""
    return decode(json.loads(text))


def strict_loads(text: str | bytes) -> Any:
    """Parse ``text`` refusing the non-standard ``NaN`` / ``Infinity`` literals (ValueError), as jq would."""
    return json.loads(text, parse_constant=_refuse_constant)
