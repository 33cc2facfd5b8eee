"""The client's message as a function of a dummy batch: a plain gradient, a DIFF2 gradient difference,
and DIFF2's per-sample clipping (Murata & Suzuki, ICML 2023; spec: ``algorithms-more.md`` §9.2, §9.6).

A DIFF2 client sends, over its whole partition of n examples,

* in a restart round: ``(1/n) sum_i clip_{C1}(grad l(x_r; z_i))``;
* in a difference round: ``(1/n) sum_i clip_{C2 * |x_r - x_{r-1}|}(grad l(x_r; z_i) - grad l(x_{r-1}; z_i))``,

with ``clip_C(g) = g * min(1, C / |g|_2)`` per example (the norm over all parameters at once) and
``|x_r - x_{r-1}|`` the L2 distance of the two global models over all parameters. The server sent both
models, so a curious server knows ``x_{r-1}`` (``ClientUpdate.reference_state``); the clip radii are the
defense's parameters, known only when ``knowledge.defense`` is granted.

:class:`MessageSpec` says how a client formed its message. :func:`fedsim.attacks.victim.victim_model` builds it
from the update and attaches it to the rebuilt model (:func:`with_message`), and every dummy message
an attack computes from a dummy batch goes through :func:`functional_message` (via
:func:`fedsim.attacks.batched.parameter_gradient` and :func:`fedsim.attacks.inverting_gradients.gradient_distance`),
so every gradient-matching attack matches what the client really sent, never a difference as if it
were a gradient. A plain spec is the mean cross-entropy gradient, exactly as before.

This module imports nothing of ``attacks`` (both of the modules above import it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.per_example import clip_per_example

#: Defenses whose messages are gradient differences (their updates carry ``reference_state``) and whose
#: per-sample clipping :func:`per_sample_clip` models.
DIFFERENCE_DEFENSES = ("diff2",)
_ATTR = "_fedsim_message"


@dataclass(frozen=True)
class MessageSpec:
    """How the client formed its message from its examples' cross-entropy losses.

    ``reference``: the full state (parameters and buffers) of the model the subtracted gradient was
    taken at (DIFF2's ``x_{r-1}``, on the attacked model's device), or ``None`` for a plain gradient.
    ``clip``: the per-example clip radius the attacker models (DIFF2: ``C1`` or ``C2 * |x_r - x_{r-1}|``),
    or ``None`` for no per-example clipping (then the message is the mean loss's gradient).
    """

    reference: Mapping[str, Tensor] | None = None
    clip: float | None = None

    @property
    def plain(self) -> bool:
        """Whether the message is the plain gradient of the mean loss (no difference, no clipping)."""
        return self.reference is None and self.clip is None


PLAIN = MessageSpec()


def with_message(model: nn.Module, spec: MessageSpec) -> nn.Module:
    """Attach ``spec`` to ``model`` (in place; returned for chaining). A deep copy keeps it."""
    object.__setattr__(model, _ATTR, spec)
    return model


def message_of(model: nn.Module) -> MessageSpec:
    """The :class:`MessageSpec` attached to ``model`` by :func:`with_message`, else :data:`PLAIN`."""
    return getattr(model, _ATTR, PLAIN)


def per_sample_clip(descriptions: Sequence[Mapping[str, Any]], delta_x: float | None) -> float | None:
    """The per-example clip radius of the first described difference defense (``update.defenses``,
    filled only under ``knowledge.defense``), or ``None`` when none is described or it does not clip.

    ``delta_x`` is ``|x_r - x_{r-1}|`` in a difference round and ``None`` in a restart round; DIFF2 clips
    at ``c1`` in restart rounds and at ``c2 * delta_x`` in difference rounds (``c1``/``c2`` ``None``:
    no clipping). Raises ``ValueError`` on a non-positive radius.
    """
    for description in descriptions:
        if description.get("name") not in DIFFERENCE_DEFENSES:
            continue
        coefficient = description.get("c1" if delta_x is None else "c2")
        if coefficient is None:
            return None
        radius = float(coefficient) * (1.0 if delta_x is None else float(delta_x))
        if not radius > 0 or not math.isfinite(radius):
            raise ValueError(f"{description['name']}: per-sample clip radius {radius} (must be a positive number)")
        return radius
    return None


def _mean_ce(module: nn.Module) -> Callable[..., Tensor]:
    def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(module, (params, buffers), (x,)), targets)

    return loss


def functional_message(module: nn.Module, spec: MessageSpec) -> Callable[[Tensor, Tensor], list[Tensor]]:
    """``(x, targets) -> message``, one tensor per ``module.named_parameters()`` entry, in ``torch.func``
    form: it composes with ``vmap`` over trials and with an outer ``grad``/``autograd.grad`` over ``x``.

    ``targets`` are class indices (B,) or probabilities (B, K) (DLG's soft labels). The message is

    * plain: ``grad_theta CE_mean(f_theta(x), targets)`` at the module's own parameters;
    * ``spec.reference``: that minus the same gradient at the reference parameters;
    * ``spec.clip``: per example (``vmap`` over the batch), the gradient (difference) clipped to
      ``spec.clip`` in L2 over all parameters, then the mean over the batch.

    ``module`` must not update running statistics in place (see :func:`fedsim.attacks.batched.stateless_model`).
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    names = list(params)
    reference = None
    if spec.reference is not None:
        reference = ({n: spec.reference[n].detach() for n in names},
                     {n: spec.reference[n] for n in buffers})
    loss = _mean_ce(module)

    if spec.clip is None:
        gradient = grad(loss)

        def mean_message(x: Tensor, targets: Tensor) -> list[Tensor]:
            g = gradient(params, buffers, x, targets)
            if reference is not None:
                g0 = gradient(*reference, x, targets)
                return [g[n] - g0[n] for n in names]
            return [g[n] for n in names]

        return mean_message

    radius = float(spec.clip)

    def one(params_: dict[str, Tensor], buffers_: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        return loss(params_, buffers_, xi.unsqueeze(0), ti.unsqueeze(0))

    per_example = vmap(grad(one), in_dims=(None, None, 0, 0))

    def clipped_message(x: Tensor, targets: Tensor) -> list[Tensor]:
        g = per_example(params, buffers, x, targets)
        if reference is not None:
            g0 = per_example(*reference, x, targets)
            g = {n: g[n] - g0[n] for n in names}
        clipped = clip_per_example({n: g[n] for n in names}, radius)
        return [clipped[n].mean(0) for n in names]

    return clipped_message


def _sends_differences(name: str) -> bool:
    from fedsim.defenses import DEFENSES, Defense  # lazy: the defenses package imports every plug-in

    return name in DEFENSES and DEFENSES.get(name).message_reference is not Defense.message_reference


def difference_defense(scenario: Any) -> Any | None:
    """The scenario's first defense spec whose clients send gradient differences in some rounds (its class
    implements :meth:`fedsim.defenses.base.Defense.message_reference`, as DIFF2 does), or ``None``."""
    return next((spec for spec in scenario.defenses if _sends_differences(spec.name)), None)


def difference_rounds(scenario: Any, rounds: Iterable[int]) -> list[int]:
    """Which of ``rounds`` (1-based) carry gradient differences: those the scenario's difference-sending
    defenses say so of (:meth:`~fedsim.defenses.base.Defense.message_reference`, the rule the capture records
    ``reference_state`` by; DIFF2: ``(round - 1) % restart_period != 0``)."""
    from fedsim.defenses import DEFENSES

    built = [DEFENSES.get(spec.name).from_spec(spec, scenario) for spec in scenario.defenses
             if _sends_differences(spec.name)]
    return [r for r in rounds if any(defense.message_reference(r) for defense in built)]
