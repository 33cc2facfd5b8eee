"""The attack protocol and registry.

An attack is built from its validated ``Params``, the scenario's declared :class:`Knowledge`, its
:class:`Budget`, a device and a seed. ``reconstruct`` receives one :class:`ClientUpdate` and
nothing else: no ground truth ever reaches it (breaching's firewall, made structural here).
Before the federation runs, ``check_scenario`` refuses scenarios whose threat model does not grant
what the attack needs, with a message saying what to grant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fedsim.errors import ThreatModelError
from fedsim.registry import Registry
from fedsim.scenario import AttackSpec, Budget, Knowledge, Scenario
from fedsim.threat import ClientUpdate, Reconstruction

ProgressFn = Callable[[int, int], None]  # (iterations done, iterations total)


class AttackParams(BaseModel):
    """Base of every attack's parameter block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Attack(ABC):
    """Base class of attack plug-ins."""

    Params: ClassVar[type[AttackParams]] = AttackParams
    #: Protocols whose updates this attack can invert.
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd", "fedavg")
    #: Knowledge the attack cannot run without, e.g. {"local_hparams": True, "labels": "known"}.
    needs: ClassVar[dict[str, Any]] = {}
    #: One line for `fedsim list` and reports.
    summary: ClassVar[str] = ""

    def __init__(
        self,
        params: AttackParams,
        knowledge: Knowledge,
        budget: Budget,
        device: torch.device,
        seed: int,
    ) -> None:
        self.params = params
        self.knowledge = knowledge
        self.budget = budget
        self.device = device
        self.seed = seed

    @classmethod
    def from_spec(cls, spec: AttackSpec, device: torch.device, seed: int) -> Attack:
        return cls(cls.Params.model_validate(spec.params), spec.knowledge, spec.budget, device, seed)

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        """Refuse a scenario whose protocol or threat model does not fit this attack."""
        protocol = scenario.federation.protocol
        if protocol not in cls.protocols:
            raise ThreatModelError(
                f"{spec.name} inverts {' or '.join(cls.protocols)} updates, but federation.protocol is {protocol!r}"
            )
        for key, wanted in cls.needs.items():
            granted = getattr(spec.knowledge, key)
            if granted != wanted:
                raise ThreatModelError(
                    f"{spec.name} needs knowledge.{key}: {wanted!r}, but the threat model grants {granted!r}"
                )

    @abstractmethod
    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Reconstruct the client's data from what the server observed."""


ATTACKS: Registry[type[Attack]] = Registry("attack")
register_attack = ATTACKS.register
