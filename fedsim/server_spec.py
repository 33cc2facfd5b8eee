"""``server``: who runs the aggregation, in the field's words.

``role: honest_but_curious`` (the default) is a server that follows the protocol and only looks at what it
receives: the global model it sent, each client's update (or, under SecAgg, only their aggregate) and the declared
metadata. ``role: malicious`` is a server that may also change the model it sends (an inserted imprint block, trap
weights, magnified class parameters) in the rounds an attack targets: the SoK's "active manipulation" capability
(threat models F, G and H of Carletti et al., USENIX Security 2025; :mod:`fedsim.threat_models`). Validation
refuses an attack whose threat model needs a malicious server when this block does not grant one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsim.spec_base import _Strict

SERVER_ROLES = ("honest_but_curious", "malicious")


class ServerSpec(_Strict):
    """The server's role in the threat model."""

    role: Literal["honest_but_curious", "malicious"] = Field(
        "honest_but_curious", description="malicious: the server may send manipulated models in attacked rounds")
