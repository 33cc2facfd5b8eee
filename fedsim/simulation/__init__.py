"""Running a scenario as a real Flower federation (Message API) on Ray or in-process."""

from fedsim.simulation.federation import run_federation
from fedsim.simulation.server_app import FederationOutcome

__all__ = ["FederationOutcome", "run_federation"]
