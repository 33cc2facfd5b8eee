"""A client-side check of the model the server sent, before training on it: what a careful deployment would run
against a malicious server (``server.role: malicious``, :mod:`fedsim.simulation.malicious`).

Two checks, in ``inspect_model`` (both client paths, before any training):

(a) **architecture** (``architecture: true``): refuse (:class:`~fedsim.errors.ModelRefusedError`, so the client sends
    nothing and the round records its failure with the reason) a model whose architecture differs from the agreed
    one: any architecture change shipped with it, a state key or shape the agreed model lacks or has otherwise, a
    module the agreed model does not have, or an extra forward hook (a parameter-free rerouting of the input).
(b) **weight statistics** (``statistics: true``): per weight tensor (``dim >= 2``; ``include_biases`` adds the
    vectors) of the agreed part, its L2 norm, mean and fraction of negative entries against a reference: the last
    model this client accepted without a flag (kept in the client's persistent state, ``Context.state``), or the
    agreed initial model (the client's copy) on its first round. A tensor is abnormal when its norm changed by more
    than a factor ``max_norm_ratio`` either way, its mean moved by more than ``max_mean_shift`` times the
    reference's RMS, or its fraction of negative entries moved by more than ``max_negative_shift``.
    ``action: flag`` reports it and trains anyway; ``action: refuse`` refuses the model.

Reported per client and round (``fedsim.<key>`` in the reply, ``client_metrics`` in metrics.json):
``model_check_flagged`` (0/1), ``model_check_layer`` (index, in the agreed ``state_dict`` order, of the first
abnormal tensor; -1 when none), ``model_check_norm_ratio`` (the largest norm change factor, >= 1),
``model_check_mean_shift`` (largest, in reference RMS units) and ``model_check_negative_shift`` (largest).

What it catches and misses (measured, seed 0, default thresholds; scenarios/defenses/model_check.yaml and
scenarios/attacks/trap_weights.yaml):

* an added imprint block (Robbing the Fed) is refused by (a) whatever its weights: the client sends nothing;
* fishing (magnified classifier rows, weights only) is flagged by (b) on the ConvNet of model_check.yaml: the
  classifier's norm changes x3.25 (> ``max_norm_ratio`` 3.0) and its sign balance by 0.46;
* trap weights with ``match_norm: true`` (their default: the trapped layer is rescaled to the honest layer's norm)
  are MISSED: norm ratio 1.00, mean shift 0.03 RMS, negative-fraction shift 0.001, while the attack recovers 49 of
  64 digits above 40 dB; with ``match_norm: false`` the layer's norm changes x69.6 and (b) flags it.

So (b) sees a weights-only manipulation only when it moves a layer's norm, mean or sign balance past the
thresholds; one that keeps them (a rescaled trap layer) passes. Honest training also moves the statistics: the
thresholds trade false flags for missed attacks, and comparing with the last accepted model (one round of honest
drift) is tighter than with the initial model.

**False flags on honest training** (honest server, mnist-5k, ConvNet width 16, seed 0; the largest statistic over
all rounds, against the initial model - what a client first sampled in a late round compares with - and against
the previous round's model - a client sampled every round):

=================================================  ===========================  ==========================
run                                                vs initial (norm/mean/neg)   vs previous round
=================================================  ===========================  ==========================
fedsgd lr 0.1, batch 16, 4 clients, 20 rounds      x1.13 / 0.06 / 0.014         x1.02 / 0.01 / 0.007
fedavg lr 0.1, 10 steps, 1 of 4 per round, 10 r.   x1.91 / 0.18 / 0.040         x1.17 / 0.07 / 0.015
fedavg lr 0.5, 30 steps, 1 of 4 per round, 5 r.    x2.67 / 0.80 / 0.250         x1.84 / 0.62 / 0.201
=================================================  ===========================  ==========================

(the last diverges to 10 % accuracy in round 2: the worst honest drift measured). At the defaults (norm x3.0, mean
1.0 RMS, negative fraction 0.3) none of these 35 honest rounds is flagged, against either base; fishing's classifier
(x3.27, 0.46) still is. The reference is kept in float64 and a statistic must pass its threshold by more than a
relative 1e-9, so one model gets one verdict whichever client checks it against the same reference (a float32
reference used to flag a model at negative-fraction shift 0.2500000099 that others passed at 0.24999999999999994).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.defenses.base import Defense, DefenseParams, UpdateContext, register_defense
from fedsim.errors import ModelRefusedError

STATE_KEY = "model_check/stats"  # (L, 3) float64 tensor in the client's state: norm, mean, fraction negative per layer
# a statistic is abnormal only past its threshold by more than this relative margin: float64 summation-order
# rounding (1e-16) at a threshold's edge must not flip the verdict on one model between clients
TOLERANCE = 1e-9


class ModelCheckParams(DefenseParams):
    architecture: bool = Field(True, description="refuse a model whose architecture differs from the agreed one")
    statistics: bool = Field(True, description="compare each weight tensor's norm/mean/sign balance to a reference")
    action: Literal["flag", "refuse"] = Field("flag", description="what abnormal weight statistics do")
    max_norm_ratio: float = Field(3.0, gt=1, description="abnormal: a tensor's L2 norm changed by more than this "
                                  "factor (either way)")
    max_mean_shift: float = Field(1.0, gt=0, description="abnormal: a tensor's mean moved by more than this many "
                                  "reference RMS")
    max_negative_shift: float = Field(0.3, gt=0, le=1, description="abnormal: a tensor's fraction of negative "
                                      "entries moved by more than this (honest training moved it up to 0.25)")
    include_biases: bool = Field(False, description="check 1-d parameters (biases) too, not only weight tensors")


def architecture_problem(received: nn.Module, agreed: nn.Module, architecture: tuple[Mapping[str, Any], ...]
                         ) -> str | None:
    """Why ``received`` is not the agreed architecture (one line), or None when it is."""
    if architecture:
        names = ", ".join(str(d.get("name")) for d in architecture)
        return f"the server's model ships architecture changes ({names}) beyond the agreed architecture"
    got, want = received.state_dict(), agreed.state_dict()
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra or missing:
        return f"the server's model has state keys {extra[:3]} the agreed one lacks and lacks {missing[:3]}"
    shapes = [k for k in want if tuple(got[k].shape) != tuple(want[k].shape)]
    if shapes:
        return f"the server's model has {shapes[0]} of shape {tuple(got[shapes[0]].shape)}, agreed " \
               f"{tuple(want[shapes[0]].shape)}"
    modules = [(n, type(m).__name__) for n, m in received.named_modules()]
    if modules != [(n, type(m).__name__) for n, m in agreed.named_modules()]:
        return "the server's model has modules the agreed architecture does not"
    if _hooks(received) != _hooks(agreed):
        return "the server's model has forward hooks the agreed architecture does not (the input is rerouted)"
    return None


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def weight_stats(model: nn.Module, names: list[str]) -> Tensor:
    """(L, 3) float64: per tensor of ``names`` (in order), its L2 norm, mean and fraction of negative entries."""
    state = model.state_dict()
    rows = []
    for k in names:
        v = state[k].detach().double().flatten()
        rows.append(torch.stack([v.norm(), v.mean(), (v < 0).double().mean()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


@register_defense("model_check")
class ModelCheck(Defense):
    """Client-side check of the received model (module doc)."""

    Params = ModelCheckParams
    stage = 10
    summary = "clients refuse a changed architecture and flag abnormal weight statistics in the model they receive"

    def checked(self, agreed: nn.Module) -> list[str]:
        """The agreed state keys the statistics check reads: floating parameters (weights; biases if asked)."""
        least = 1 if self.params.include_biases else 2
        return [n for n, p in agreed.named_parameters() if p.is_floating_point() and p.dim() >= least]

    def inspect_model(self, received: nn.Module, agreed: nn.Module, architecture: tuple[Mapping[str, Any], ...],
                      ctx: UpdateContext) -> dict[str, float]:
        p = self.params
        if p.architecture:
            problem = architecture_problem(received, agreed, architecture)
            if problem is not None:
                raise ModelRefusedError(f"model_check: {problem}")
        metrics = {"model_check_flagged": 0.0}
        if not p.statistics:
            return metrics
        names = self.checked(agreed)
        now = weight_stats(received, names)
        reference = ctx.state.get(STATE_KEY)
        if not isinstance(reference, Tensor) or tuple(reference.shape) != tuple(now.shape):
            reference = weight_stats(agreed, names)  # first round: the agreed initial model
        ref = reference.double()  # stored in float64 (older float32 states are widened): one model, one verdict
        numel = torch.tensor([float(agreed.state_dict()[k].numel()) for k in names], dtype=torch.float64)
        tiny = 1e-12
        # clamped, not offset, so an unchanged tensor has ratio exactly 1 and shifts exactly 0
        ratio = torch.maximum(now[:, 0] / ref[:, 0].clamp_min(tiny), ref[:, 0] / now[:, 0].clamp_min(tiny))
        mean_shift = (now[:, 1] - ref[:, 1]).abs() / (ref[:, 0] / numel.sqrt()).clamp_min(tiny)
        negative_shift = (now[:, 2] - ref[:, 2]).abs()
        abnormal = ((ratio > p.max_norm_ratio * (1 + TOLERANCE)) | (mean_shift > p.max_mean_shift * (1 + TOLERANCE))
                    | (negative_shift > p.max_negative_shift * (1 + TOLERANCE)))
        layer = int(abnormal.nonzero()[0, 0]) if bool(abnormal.any()) else -1
        order = list(agreed.state_dict())
        metrics.update(
            model_check_flagged=float(layer >= 0),
            model_check_layer=float(order.index(names[layer])) if layer >= 0 else -1.0,
            model_check_norm_ratio=_largest(ratio), model_check_mean_shift=_largest(mean_shift),
            model_check_negative_shift=_largest(negative_shift),
        )
        if layer >= 0 and p.action == "refuse":
            raise ModelRefusedError(
                f"model_check: abnormal weights in {names[layer]} (norm x{float(ratio[layer]):.3g}, mean shift "
                f"{float(mean_shift[layer]):.3g} RMS, negative-fraction shift {float(negative_shift[layer]):.3g})")
        if layer < 0:  # only an accepted, normal model becomes the next reference (float64, as computed)
            ctx.state[STATE_KEY] = now
        return metrics


def _largest(values: Tensor) -> float:
    out = float(values.max()) if values.numel() else 0.0
    return out if math.isfinite(out) else 1e12
