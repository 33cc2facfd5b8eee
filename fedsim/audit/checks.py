"""Validation of the ``audit:`` block against the rest of the scenario: what ``fedsim validate`` accepts must run.

:func:`check_audit` is called by :func:`fedsim.scenario.parse_scenario` (after the plug-ins' own checks) and raises
:class:`~fedsim.errors.ScenarioError` with the YAML field path (one line, exit 2 at the CLI) for a federation the
canaries cannot run in correctly:

* ``federation.protocol: zeroth_order``: clients send loss values, not gradients or model updates;
* ``federation.staleness``: a slow client's update is rebased from an older global model, so a canary's
  contribution to the released model is not the one the audit scores, and no accountant covers the rule;
* ``server.role: malicious``: the server changes the model the clients train, outside the DP guarantee audited;
* ``level: example`` without a sample-level DP defense (``Defense.audits_examples``: dp_sgd, dp_sat, dp_sam,
  diff2): example canaries are records inside such a defense's clipped sum;
* ``level: client`` under a sample-level DP defense: its accountant bounds one example's influence, not one
  client's, so an empirical client-level epsilon has no accountant epsilon to be compared with;
* ``client_norm`` where it would be ignored: at the example level (the canaries' norm is the defense's clipping
  norm). Under central_dp it is the canaries' update norm BEFORE the clipping (default 10 x the clipping norm).
"""

from __future__ import annotations

from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario


def check_audit(scenario: Scenario) -> None:
    """Refuse an ``audit:`` block its federation cannot carry (module doc); nothing without one.

    The protocol checks need no plug-in (they run before the zeroth-order branch of ``parse_scenario``); the
    defense checks look the scenario's defenses up in the registry (unknown names are left to its own check).
    """
    spec = scenario.audit
    if spec is None:
        return
    fed = scenario.federation
    if fed.protocol == "zeroth_order" or scenario.zeroth_order is not None:
        raise ScenarioError("audit", "zeroth-order clients send loss values, not gradients or model updates: there "
                                     "is no update for a canary to enter (remove audit)")
    if fed.staleness is not None:
        raise ScenarioError("federation.staleness", "audit: a slow client's update is rebased from an older global "
                                                    "model, so a canary's contribution to the released model is not "
                                                    "the one the audit scores: remove staleness or audit")
    if scenario.server.role == "malicious":
        raise ScenarioError("server.role", "audit: a malicious server changes the model the clients train, outside "
                                           "the DP guarantee the audit measures: audit an honest_but_curious server")
    from fedsim.plugins import defense_registry

    registry = defense_registry()
    kinds = [(d.name, registry.get(d.name)) for d in scenario.defenses if d.name in registry]
    sample_level = [name for name, kind in kinds if getattr(kind, "audits_examples", False)]
    level = spec.level if spec.level != "auto" else ("example" if sample_level else "client")
    if level == "example" and not sample_level:
        raise ScenarioError("audit.level", "example canaries are records inside a sample-level DP defense (dp_sgd, "
                                           "dp_sat, dp_sam, diff2), and the scenario has none: use level client "
                                           "(or auto)")
    if level == "client" and sample_level:
        raise ScenarioError("audit.level", f"client canaries under {sample_level[0]}: its accountant bounds one "
                                           "example's influence, not one client's, so a client-level empirical "
                                           "epsilon has nothing to be compared with: use level example (or auto)")
    if spec.client_norm is not None and level == "example":
        raise ScenarioError("audit.client_norm", "applies to client canaries only: example canaries have the "
                                                 "defense's clipping norm")
