"""Defense-aware gradient matching (GIFD; Fang et al., ICCV 2023): model the client's defenses.

When the threat model grants ``knowledge.defense``, the update lists public descriptions
``{"name": ..., **params}`` of the client-side defenses in place, in the order they were applied.
GIFD (``defense.py``, ported from GGL) applies the deterministic ones, clipping, pruning and the
Soteria mask, to its own dummy gradient before the distance, so the dummy gradient is compared with
the target on equal terms; noise is not modelled. Here every listed defense whose class implements
:meth:`~fedsim.defenses.base.Defense.attacker_transform` is rebuilt from its description and its transform
is applied, in order, to the dummy gradient; the others (noise, stochastic rounding, Soteria, whose
mask depends on private data) are skipped and reported.

The transforms must stay differentiable: clipping is a differentiable rescale, pruning multiplies by a
mask computed from the dummy's own (detached) magnitudes, quantization passes the gradient straight
through. :func:`defense_transform` returns a callable on a list (in ``names`` order) or a dict of
per-parameter gradients, keyed by parameter name, so any gradient-matching attack can reuse it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from torch import Tensor

from fedsim.attacks.differences import DIFFERENCE_DEFENSES

Description = Mapping[str, Any]


def _build(description: Description) -> tuple[Any | None, str]:
    """The defense described (``None`` if it has nothing to model) and why it was skipped, if it was."""
    from fedsim.defenses import DEFENSES, Defense  # lazy: the defenses package imports every plug-in
    from fedsim.scenario import DefenseSpec

    name = str(description.get("name", ""))
    if name not in DEFENSES:
        return None, f"{name or '<unnamed>'}: not a registered defense"
    cls = DEFENSES.get(name)
    if cls.attacker_transform is Defense.attacker_transform:
        return None, f"{name}: no deterministic part to model"
    params = {k: v for k, v in description.items() if k != "name"}
    return cls.from_spec(DefenseSpec(name=name, params=params)), ""


@dataclass(frozen=True)
class DefenseTransform:
    """The attacker-side transforms of some defenses, applied in order to a dummy gradient.

    ``names`` are the parameter names that key a gradient given as a list (``model.parameters()``
    order); ``modeled`` and ``skipped`` say which described defenses are applied and which are not.
    """

    defenses: tuple[Any, ...]
    names: tuple[str, ...] = ()
    modeled: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every defense's ``attacker_transform`` in order on ``grads`` (keyed by parameter name).

        A transform returning ``None`` (nothing to model for these parameters) leaves the gradient as
        it is; keys a transform does not return keep their value.
        """
        out = dict(grads)
        for defense in self.defenses:
            result = defense.attacker_transform(dict(out))
            if result is not None:
                out = {key: result.get(key, value) for key, value in out.items()}
        return out

    @overload
    def __call__(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    @overload
    def __call__(self, grads: Sequence[Tensor]) -> list[Tensor]: ...

    def __call__(self, grads: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor] | list[Tensor]:
        """Transform a dict keyed by parameter name, or a list in ``names`` order (returns the same kind)."""
        if isinstance(grads, Mapping):
            return self.apply(grads)
        if len(grads) != len(self.names):
            raise ValueError(f"{len(grads)} gradients for {len(self.names)} parameter names")
        out = self.apply(dict(zip(self.names, grads, strict=True)))
        return [out[name] for name in self.names]


def unmodelable(scenario: Any, also: Sequence[str] = ()) -> str | None:
    """Why a defense-aware mode would model nothing in ``scenario`` (no defense, or none with an
    ``attacker_transform``: e.g. pure noise), or ``None`` when at least one defense can be modelled.

    ``also``: defense names the attack models elsewhere, in its simulation of the client's message
    (DIFF2's per-sample clipping in :mod:`fedsim.attacks.differences`, DP-SAT's perturbed point in unrolling).
    """
    from fedsim.defenses import DEFENSES, Defense  # lazy: the defenses package imports every plug-in

    names = [spec.name for spec in scenario.defenses]
    if not names:
        return "the scenario has no defense: there is nothing to model"
    if any(n in also for n in names):
        return None
    if not any(DEFENSES.get(n).attacker_transform is not Defense.attacker_transform for n in names if n in DEFENSES):
        return f"none of its defenses ({', '.join(names)}) has a deterministic part to model"
    return None


def defense_transform(descriptions: Sequence[Description], names: Sequence[str] = ()) -> DefenseTransform:
    """The attacker-side transform of the described defenses (the identity if none has one to apply).

    ``descriptions`` is ``update.defenses`` (empty unless the threat model grants
    ``knowledge.defense``); ``names`` keys list inputs, e.g. ``[n for n, _ in model.named_parameters()]``.
    ``.defenses`` is empty when nothing is modelled here; a DIFF2 description is listed in ``.modeled``
    but applied by the message itself (per-sample clipping, :func:`fedsim.attacks.victim.message_spec`).
    Invalid parameters in a description raise ``ValueError`` (pydantic's validation error).
    """
    built, modeled, skipped = [], [], []
    for description in descriptions:
        if description.get("name") in DIFFERENCE_DEFENSES:  # modelled in the message (attacks.differences)
            modeled.append(str(description["name"]))
            continue
        defense, why = _build(description)
        if defense is None:
            skipped.append(why)
        else:
            built.append(defense)
            modeled.append(defense.name)
    return DefenseTransform(tuple(built), tuple(names), tuple(modeled), tuple(skipped))
