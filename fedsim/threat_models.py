"""The SoK threat-model letters A-H (Carletti, Foggia, Mazzocca, Parrella, Vento: "SoK: Gradient Inversion
Attacks in Federated Learning", USENIX Security 2025; the living tables of ``gparrella12/sok_gias_fl``).

Each letter is a set of capabilities the attacker holds (the SoK's table columns):

======  ==============================  ==========================================================================
letter  name                            capabilities (cumulative)
======  ==============================  ==========================================================================
A       Eavesdropper                    the model updates
B       Informed Eavesdropper           + basic knowledge (the architecture, the loss, the number of examples)
C       Parameter-Aware Eavesdropper    + training details (local learning rate, steps, batch size)
D       Data-Enhanced Eavesdropper      + surrogate data (auxiliary images from the task's distribution)
E       Statistical-Informed Eaves.     + the client data's distribution (e.g. BatchNorm statistics)
F       Active Manipulator              C + active manipulation (the server changes the model it sends)
G       Data-Enhanced Manipulator       D + active manipulation
H       Active Client Manipulator       G + client selection (the server chooses who trains with what)
======  ==============================  ==========================================================================

What a scenario grants an attack is read from its declared knowledge and the server's role
(:func:`granted_capabilities`); every attack plug-in declares the letter it needs (``Attack.threat_model``, or
``Attack.threat_model_for`` when its parameters change it) and what it assumes beyond the letter
(``Attack.assumes``, plain words for reports). :func:`refusal` says, with the YAML field path, why a scenario does
not grant an attack its letter. fedsim's server built the model, so "basic knowledge" is always granted: a scenario
never grants less than B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsim.yaml_literal import yaml_repr

if TYPE_CHECKING:
    from fedsim.scenario import AttackSpec, Scenario

UPDATES = "model updates"
BASIC = "basic knowledge"
TRAINING = "training details"
SURROGATE = "surrogate data"
DISTRIBUTION = "client data distribution"
MANIPULATION = "active manipulation"
SELECTION = "client selection"

CAPABILITIES = (UPDATES, BASIC, TRAINING, SURROGATE, DISTRIBUTION, MANIPULATION, SELECTION)


@dataclass(frozen=True)
class ThreatModel:
    """One SoK letter: its name, the capabilities it holds, and the SoK's real-world applicability (1-3 stars:
    3 = highly applicable and less detectable, 1 = less applicable and more detectable)."""

    letter: str
    name: str
    capabilities: frozenset[str]
    applicability: int

    @property
    def malicious(self) -> bool:
        """Whether the attacker changes what the clients receive (F, G, H)."""
        return MANIPULATION in self.capabilities

    def describe(self) -> str:
        """``"G (Data-Enhanced Manipulator)"``."""
        return f"{self.letter} ({self.name})"


def _caps(*names: str) -> frozenset[str]:
    return frozenset(names)


_A = _caps(UPDATES)
_B = _A | {BASIC}
_C = _B | {TRAINING}
_D = _C | {SURROGATE}
_E = _D | {DISTRIBUTION}

THREAT_MODELS: dict[str, ThreatModel] = {
    "A": ThreatModel("A", "Eavesdropper", _A, 3),
    "B": ThreatModel("B", "Informed Eavesdropper", _B, 3),
    "C": ThreatModel("C", "Parameter-Aware Eavesdropper", _C, 3),
    "D": ThreatModel("D", "Data-Enhanced Eavesdropper", _D, 2),
    "E": ThreatModel("E", "Statistical-Informed Eavesdropper", _E, 2),
    "F": ThreatModel("F", "Active Manipulator", _C | {MANIPULATION}, 1),
    "G": ThreatModel("G", "Data-Enhanced Manipulator", _D | {MANIPULATION}, 1),
    "H": ThreatModel("H", "Active Client Manipulator", _D | {MANIPULATION, SELECTION}, 1),
}

#: Where a scenario grants each capability (``{i}``: the attack's index), for refusal messages.
GRANTED_BY = {
    TRAINING: ("attacks[{i}].knowledge.local_hparams", "true"),
    SURROGATE: ("attacks[{i}].knowledge.auxiliary_data", "true"),
    DISTRIBUTION: ("attacks[{i}].knowledge.bn_stats", "running"),
    MANIPULATION: ("server.role", "malicious"),
    SELECTION: ("server.role", "malicious"),
}


def threat_model(letter: str) -> ThreatModel:
    """The SoK threat model ``letter`` (A-H). Raises ``KeyError`` for any other string."""
    return THREAT_MODELS[letter]


def granted_capabilities(scenario: Scenario, spec: AttackSpec) -> frozenset[str]:
    """The capabilities ``scenario`` grants the attack ``spec``: updates and basic knowledge always (the server
    built the model), training details with ``knowledge.local_hparams``, surrogate data with
    ``knowledge.auxiliary_data``, the client data's distribution with ``knowledge.bn_stats: running``, active
    manipulation and client selection with ``server.role: malicious``."""
    k = spec.knowledge
    caps = set(_B)
    if k.local_hparams:
        caps.add(TRAINING)
    if k.auxiliary_data:
        caps.add(SURROGATE)
    if k.bn_stats != "none":
        caps.add(DISTRIBUTION)
    if scenario.server.role == "malicious":
        caps |= {MANIPULATION, SELECTION}
    return frozenset(caps)


def strongest_letter(caps: frozenset[str]) -> ThreatModel:
    """The most capable SoK letter whose capabilities all lie in ``caps`` (what a scenario grants, as a letter)."""
    fitting = [tm for tm in THREAT_MODELS.values() if tm.capabilities <= caps]
    return max(fitting, key=lambda tm: (len(tm.capabilities), tm.letter))


def refusal(scenario: Scenario, index: int, spec: AttackSpec, needed: str) -> tuple[str, str] | None:
    """``(YAML field path, reason)`` when ``scenario`` does not grant attack ``index`` (``spec``) the capabilities
    of SoK letter ``needed``; None when it does. The path is ``server.role`` when the letter needs a malicious server
    the scenario does not grant, else the field that would grant the first missing capability; the reason names
    every field to set."""
    tm = THREAT_MODELS[needed]
    missing = [c for c in CAPABILITIES if c in tm.capabilities - granted_capabilities(scenario, spec)]
    if not missing:
        return None
    fields = list(dict.fromkeys(GRANTED_BY[c] for c in missing))  # manipulation and selection share server.role
    fields.sort(key=lambda f: f[0] != "server.role")  # a malicious letter's defining grant is named first
    path = fields[0][0].format(i=index)
    current = scenario.server.role if path == "server.role" else getattr(spec.knowledge, path.rsplit(".", 1)[1])
    grant = " and ".join(f"{p.format(i=index)}: {v}" for p, v in fields)
    return path, (f"{spec.name} needs threat model {tm.describe()}, which requires {', '.join(missing)}; "
                  f"this scenario has {yaml_repr(current)} here: set {grant} to grant it")


def exercised_letter(own: str, manipulator: str) -> str:
    """The least capable SoK letter holding the capabilities of both ``own`` and ``manipulator``: what an attack
    needing ``own`` exercises when the update it reads answers a model an attack needing ``manipulator`` built
    (``exercised_letter("B", "F") == "F"``, ``("D", "F") -> "G"``), or what an eavesdropper needing ``own`` needs once
    it also uses a capability of ``manipulator`` (``("A", "C") -> "C"``, ``("E", "C") -> "E"``). When no letter holds
    the union (an E attack's client data distribution on a manipulated model), ``"<manipulator>+<own>"`` (``"F+E"``),
    so an outcome is never filed under the weaker of the two. Raises ``KeyError`` for a letter outside A-H."""
    union = THREAT_MODELS[own].capabilities | THREAT_MODELS[manipulator].capabilities
    fitting = [tm for tm in THREAT_MODELS.values() if union <= tm.capabilities]
    if not fitting:
        return f"{manipulator}+{own}"
    return min(fitting, key=lambda tm: (len(tm.capabilities), tm.letter)).letter


def sok_tag(letter: str | None, manipulated_by: str | None = None) -> str:
    """How reports name an outcome's threat model after the attack: ``" [SoK B]"``, or ``" [SoK F: on the model
    manipulated by fishing]"`` when the update it attacked answers a model another attack (``manipulated_by``, its
    name) manipulated; "" without a letter (metrics.json written before issue 14)."""
    if not letter:
        return ""
    return f" [SoK {letter}" + (f": on the model manipulated by {manipulated_by}]" if manipulated_by else "]")


def needed_letter(spec: AttackSpec) -> str:
    """The SoK letter attack ``spec`` needs: its registered class's ``threat_model_for(params, knowledge)``.
    Raises ``KeyError`` for an unregistered attack name (validation refuses those first)."""
    from fedsim.plugins import attack_registry

    plugin = attack_registry().get(spec.name)
    return plugin.threat_model_for(plugin.Params.model_validate(spec.params), spec.knowledge)


def threat_model_record(scenario: Scenario) -> dict[str, object]:
    """What metrics.json records of the threat model: ``{"server_role": ..., "attacks": [{"attack", "attack_index",
    "needed", "granted"}, ...]}``, ``needed`` the letter each attack needs (:func:`needed_letter`) and ``granted`` the
    strongest letter the scenario grants it (:func:`strongest_letter` of :func:`granted_capabilities`)."""
    return {
        "server_role": scenario.server.role,
        "attacks": [{"attack": spec.name, "attack_index": i, "needed": needed_letter(spec),
                     "granted": strongest_letter(granted_capabilities(scenario, spec)).letter}
                    for i, spec in enumerate(scenario.attacks)],
    }
