"""One typed error family, so the CLI can turn any of them into a one-line message and exit code 2."""

from __future__ import annotations


class FedsimError(Exception):
    """Base class of every error fedsim reports to a user as one line. ``exit_code`` is the command's exit status:
    2 for bad input (the default); a subclass for a fedsim fault it reports cleanly sets another (1)."""

    exit_code = 2


class ScenarioError(FedsimError):
    """A scenario field is missing, unknown or has a bad value. ``path`` is the YAML field path."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class RegistryError(FedsimError):
    """A name was looked up in a registry (datasets, models, attacks, defenses) that does not hold it."""


class PluginImportError(FedsimError, ImportError):
    """A plug-in module (``attacks/*.py``, ``defenses/*.py``) could not be imported while the registries were being
    filled: the message names its file and the fix. Also an :class:`ImportError`, for callers that catch those."""


class DataUnavailableError(FedsimError):
    """A dataset is not on disk and may not be downloaded; the message says where to put the files."""


class ThreatModelError(FedsimError):
    """An attack needs knowledge that the scenario's threat model does not grant."""


class IncompatibleDefenseError(FedsimError):
    """A defense cannot be combined with the model, protocol or other defenses of a scenario."""


class SimulationError(FedsimError):
    """A client failed during the federation (Flower would otherwise log it and carry on)."""


class NoProgressError(SimulationError):
    """A federation round aggregated no client update, so the run cannot make progress."""


class ModelRefusedError(Exception):
    """A client-side check (``Defense.inspect_model``) refused the model the server sent; the message says why.
    Raised inside a client round: the client's error mod turns it into an error reply, recorded as that client's
    failure in the round (it is not a user-input error, so it is not a :class:`FedsimError`)."""
