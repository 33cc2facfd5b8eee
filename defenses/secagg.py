"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+: Bell et al., CCS 2020) via Flower's SecAgg+.

With it the honest-but-curious server learns only the aggregate of the sampled clients' updates
(quantized to ``quantization_range`` levels over ``[-clipping_range, clipping_range]``), never an
individual one; fedsim's attacks then run against that aggregate, i.e. one update of the union of
all clients' batches. SecAgg is cryptography, not noise: the aggregate itself still leaks (see the
tutorial), which is why it is usually combined with DP.

The federation switches to Flower's legacy SecAgg+ workflow when a defense sets
``secure_aggregation = True`` (see ``fedsim/simulation/secure.py``).
"""

from __future__ import annotations

from pydantic import Field

from fedsim.defenses.base import Defense, DefenseParams, register_defense
from fedsim.errors import IncompatibleDefenseError, ScenarioError
from fedsim.scenario import DefenseSpec, Scenario


class SecAggParams(DefenseParams):
    num_shares: int = Field(3, ge=3, description="key shares per client (odd: Flower crashes on even counts)")
    reconstruction_threshold: int = Field(2, ge=2, description="shares needed to rebuild a dropped client's key")
    clipping_range: float = Field(8.0, gt=0, description="values are clipped to +-range before quantization")
    quantization_range: int = Field(2**22, ge=2**8, lt=2**32,
                                    description="quantization levels (below Flower's modulus range 2**32)")


@register_defense("secagg")
class SecureAggregation(Defense):
    Params = SecAggParams
    stage = 90
    summary = "SecAgg+ (Flower): the server sees only the aggregate of all clients' updates"
    secure_aggregation = True

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        p = cls.Params.model_validate(spec.params)
        fed = scenario.federation
        if p.num_shares % 2 == 0:
            raise ScenarioError("params.num_shares", f"must be odd (got {p.num_shares}): Flower's SecAgg+ fails on "
                                                     "even share counts")
        if p.num_shares > fed.clients:
            raise ScenarioError("params.num_shares", f"{p.num_shares} > federation.clients ({fed.clients})")
        if p.reconstruction_threshold >= p.num_shares:  # Flower's SecAggPlusWorkflow requires strictly less
            raise ScenarioError("params.reconstruction_threshold", "must be < params.num_shares")
        if fed.sampled_per_round != fed.clients:
            raise IncompatibleDefenseError("secagg runs every client every round: remove federation.clients_per_round")
        others = [d.name for d in scenario.defenses if d.name != spec.name]
        blocked = [n for n in others if n in ("central_dp", "secagg")]
        if blocked:
            raise IncompatibleDefenseError(f"secagg cannot be combined with {blocked[0]} in this version")
