"""``federation.staleness``: slow clients whose updates arrive late (Wang & Gao, AAAI 2025; spec §12.1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedsim.spec_base import _PathError, _Strict
from fedsim.stale_gi_spec import GIConversion

STALE_AGGREGATIONS = ("direct", "downweight", "dc_asgd", "gi_conversion", "no_staleness")


class StalenessSpec(_Strict):
    """Slow clients whose updates arrive ``tau`` rounds late (Wang & Gao, AAAI 2025; spec §12.1).

    A slow client sampled in round t trains from the global model of ``tau`` rounds before the current one and
    its result is aggregated in round t by ``aggregation`` (:mod:`fedsim.simulation.staleness`). Which clients
    are slow: ``slow_clients`` (partition ids) or the ``num_slow`` clients holding most examples of
    ``slow_class`` (ties: lower partition id first).
    """

    tau: int = Field(..., ge=1, strict=True, description="staleness in rounds (an integer, not a bool)")
    slow_clients: list[int] | None = Field(None, description="partition ids of the slow clients")
    slow_class: int | None = Field(None, ge=0, description="the slow clients are those holding most of this class")
    num_slow: int = Field(1, ge=1, description="how many clients slow_class makes slow")
    schedule: Literal["sampled", "round_robin"] = Field(
        "sampled", description="who trains each round: seeded sampling, or the paper's round-robin blocks")
    aggregation: Literal["direct", "downweight", "dc_asgd", "gi_conversion", "no_staleness"] = "direct"
    dc_lambda: float = Field(4.0, ge=0, description="DC-ASGD's compensation weight (the authors' code: 4)")
    gi: GIConversion | None = Field(None, description="gi_conversion's settings (default GIConversion())")

    @model_validator(mode="after")
    def _check_slow(self) -> StalenessSpec:
        if (self.slow_clients is None) == (self.slow_class is None):
            raise _PathError("slow_clients", "give exactly one of slow_clients (partition ids) or slow_class")
        if self.slow_clients is not None and not self.slow_clients:
            raise _PathError("slow_clients", "an empty list makes no client slow")
        if self.slow_clients is not None and len(set(self.slow_clients)) < len(self.slow_clients):
            raise _PathError("slow_clients", f"{self.slow_clients} names a client twice")
        if self.slow_clients is not None and "num_slow" in self.model_fields_set:
            raise _PathError("num_slow", "only read with slow_class; slow_clients already names the slow clients")
        if self.gi is not None and self.gi.mix == "decay" and not (self.gi.switch_round or self.gi.drift_threshold):
            raise _PathError("gi.mix", "decay starts at a switch: set gi.switch_round or gi.drift_threshold")
        if self.gi is not None and self.aggregation != "gi_conversion":
            raise _PathError("gi", f"settings of gi_conversion, but aggregation is {self.aggregation}")
        return self
