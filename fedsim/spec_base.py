"""The base of every scenario block: strict, frozen pydantic models, and the error a validator raises to name
a field below its own model. Kept apart from :mod:`fedsim.scenario` so the blocks that live in their own files
(:mod:`fedsim.staleness_spec`, :mod:`fedsim.server_spec`) import it without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _PathError(ValueError):
    """Raised inside validators to report an error at a path below the validator's own model (the top-level
    Scenario's validators give whole paths; a nested model's, paths relative to it)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}|{reason}")
