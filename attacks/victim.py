"""The attacker's copy of the victim model and the target gradient it matches.

The server built the global model, so the attacker can rebuild it from ``update.task.model`` (a dict
of :class:`~fedsim.scenario.ModelSpec` fields) and load ``update.global_state``. It then runs that
copy in *attacker mode*: normalization layers in train mode, as the client trained (public protocol
knowledge), but dropout deterministic (identity), since this attacker does not model the client's
random masks (the Dropout Inversion Attack does).

Defenses that reshape the model (MID's bottleneck head, inserted dropout) are listed in
``update.task.model_transforms``; the rebuild applies their ``transform_model`` in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from fedsim.attacks.differences import MessageSpec, per_sample_clip, with_message
from fedsim.errors import FedsimError
from fedsim.models import build_model, dropout_layers
from fedsim.per_example import step_norm
from fedsim.scenario import DefenseSpec, ModelSpec
from fedsim.threat import ClientUpdate, TaskInfo


class UpdateMismatchError(FedsimError, ValueError):
    """An update does not fit the model the attacker rebuilt (missing names, wrong shapes)."""


def attacker_mode(model: nn.Module) -> nn.Module:
    """Train mode for every layer except dropout, which becomes the identity (no mask is set)."""
    model.train()
    for layer in dropout_layers(model).values():
        layer.set_mask(None)
        layer.eval()
    for layer in model.modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.eval()
    return model


def apply_model_transforms(model: nn.Module, transforms: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply, in order, the ``transform_model`` of the defenses the server applied when it built the
    model (``TaskInfo.model_transforms``: public name and parameters, e.g. MID's bottleneck head)."""
    if not transforms:
        return model  # without one, the defenses package (every plug-in, Flower with them) is never imported
    from fedsim.defenses import DEFENSES  # lazy: the defenses package imports every plug-in

    for description in transforms:
        params = {k: v for k, v in description.items() if k != "name"}
        spec = DefenseSpec(name=description["name"], params=params)
        model = DEFENSES.get(spec.name).from_spec(spec).transform_model(model)
    return model


def rebuild_model(task: TaskInfo, state: Mapping[str, Tensor], what: str = "global state") -> nn.Module:
    """The task's architecture with the model-shaping defenses' transforms applied and ``state`` loaded
    (on CPU, train mode). Raises :class:`UpdateMismatchError` when the state does not fit."""
    model = build_model(ModelSpec(**dict(task.model)), task.input_shape, task.num_classes,
                        vocab_size=task.vocab_size)
    model = apply_model_transforms(model, task.model_transforms)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise UpdateMismatchError(f"{what} does not fit the {task.model.get('name')} model: {err}") from None
    return model


def victim_model(update: ClientUpdate, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the global model of ``update`` on ``device``, load its state and set attacker mode.

    The model carries how the client formed its message (:func:`message_spec`), so every dummy message
    computed from it (:func:`fedsim.attacks.inverting_gradients.gradient_distance`,
    :func:`fedsim.attacks.batched.parameter_gradient`) is the gradient difference a DIFF2 client sent in a
    difference round, with DIFF2's per-sample clipping when ``knowledge.defense`` describes it.
    Raises :class:`UpdateMismatchError` when the state or the reference state does not fit the
    declared architecture, ``ValueError`` on a described clip radius that is not positive.
    """
    model = attacker_mode(rebuild_model(update.task, update.global_state).to(device))
    return with_message(model, message_spec(update, model))


def message_spec(update: ClientUpdate, model: nn.Module) -> MessageSpec:
    """How the client formed ``update`` (:class:`fedsim.attacks.differences.MessageSpec`), for ``model`` (its
    rebuilt global model): a difference against ``update.reference_state`` when the update carries one,
    per-sample clipping at the radius of the described DIFF2 defense (``c1`` in restart rounds,
    ``c2 * |x_r - x_{r-1}|`` over all parameters in difference rounds) when ``update.defenses`` lists it."""
    reference = None
    delta_x = None
    if update.reference_state is not None:
        device = next(model.parameters()).device
        rebuilt = rebuild_model(update.task, update.reference_state, "reference state")
        reference = MappingProxyType({k: v.detach().to(device) for k, v in rebuilt.state_dict().items()})
        delta_x = step_norm(update.global_state, update.reference_state,
                            [name for name, _ in model.named_parameters()])
    return MessageSpec(reference, per_sample_clip(update.defenses, delta_x))


def target_gradient(update: ClientUpdate, model: nn.Module) -> list[Tensor]:
    """The gradient to match, one tensor per ``model.parameters()`` entry, on the model's device.

    For ``fedsgd`` it is the update itself (the gradient of the client's mean loss). For ``fedavg``
    it is ``-delta`` restricted to the parameter names: a single local step gives
    ``delta = -lr * grad``, and for several steps ``-delta`` is still the summed descent direction.
    Only its direction matters under the (scale-invariant) cosine distance; unrolling the local steps
    is a separate attack. Raises :class:`UpdateMismatchError` on missing names or mismatched shapes.
    """
    if update.update is None:
        raise UpdateMismatchError("the client sent no update")
    protocol = update.task.protocol
    if protocol not in ("fedsgd", "fedavg"):
        raise UpdateMismatchError(f"unknown protocol {protocol!r} (known: fedsgd, fedavg)")
    sign = -1.0 if protocol == "fedavg" else 1.0
    out = []
    for name, param in model.named_parameters():
        if name not in update.update:
            raise UpdateMismatchError(f"the update has no entry for parameter {name!r}")
        value = torch.as_tensor(update.update[name])
        if value.shape != param.shape:
            raise UpdateMismatchError(
                f"update[{name!r}] has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
            )
        out.append(sign * value.detach().to(device=param.device, dtype=param.dtype))
    return out


def check_update(update: ClientUpdate | None) -> str | None:
    """Why this update cannot be attacked (``None``, empty, non-finite, all zero), or ``None`` if it can."""
    if update is None or update.update is None:
        return "no update to attack"
    values = [torch.as_tensor(v) for v in update.update.values()]
    if not values or all(v.numel() == 0 for v in values):
        return "the update is empty"
    floats = [v for v in values if v.is_floating_point()]
    if any(not bool(torch.isfinite(v).all()) for v in floats):
        return "the update contains NaN or infinite values"
    if all(not bool(v.any()) for v in floats):
        return "the update is all zeros (nothing to invert)"
    if update.num_examples < 1 or not math.isfinite(update.num_examples):
        return f"the update reports {update.num_examples} examples"
    return None


def first_layer(model: nn.Module) -> tuple[int, list[tuple[str, nn.Module]]] | None:
    """Where the model's input first meets weights: ``(k, leaves)`` with ``leaves`` the model's leaf modules
    ``(name, module)`` in registration (forward) order and ``leaves[k]`` the first one holding parameters of its
    own; None when no module holds any. The analytic attacks (``analytic_fc``, ``trap_weights``) check that layer."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    k = next((i for i, (_, m) in enumerate(leaves) if any(True for _ in m.parameters(recurse=False))), None)
    return None if k is None else (k, leaves)
