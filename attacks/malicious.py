"""The base of malicious-server attacks: build the model to send, then read the clients' updates of it.

A :class:`MaliciousAttack` runs in two places. During the federation, in each round it targets, the server calls
:meth:`MaliciousAttack.manipulate` with a :class:`~fedsim.threat.ManipulationView` (the honest global model and
only what the threat model grants) and sends the returned :class:`~fedsim.threat.ServerModel` through the normal
Flower TRAIN message to the targeted clients (or to every sampled client, ``to_all``), who train on it like on any
model (:mod:`fedsim.simulation.malicious`). After the federation, :meth:`reconstruct` receives the captured update
as usual: its ``global_state`` is the manipulated state the server sent and ``architecture`` the changes it
shipped, so the attack needs no memory between the two calls (the manipulation is read back from what was sent).

Validation refuses these attacks unless ``server.role: malicious`` (their SoK letters F, G or H need active
manipulation, :mod:`fedsim.threat_models`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from fedsim.attacks.base import Attack
from fedsim.threat import ManipulationView, ServerModel


class MaliciousAttack(Attack):
    """Base of attacks that change the model the server sends (SoK threat models F-H)."""

    threat_model: ClassVar[str] = "F"
    #: Whether it changes the architecture (adds modules) or only the agreed model's weights; a client-side
    #: architecture check (defense ``model_check``) catches the first kind.
    changes_architecture: ClassVar[bool] = False
    min_iterations: ClassVar[int] = 0

    @abstractmethod
    def manipulate(self, view: ManipulationView) -> ServerModel:
        """The model to send in ``view.round`` instead of ``view.global_state``. Deterministic given the attack's
        seed (the same scenario and seed send the same model on every backend)."""
