"""The imprint block of Robbing the Fed (Fowl, Geiping, Czaja, Goldblum, Goldstein; ICLR 2022, Sec. 3) and the
architecture change ``"imprint"`` that inserts it in front of the agreed model.

The block sees the flattened (normalized) input ``x`` (d,) and computes, for its ``N`` rows (bins),

    h_i = w_i . x + b_i,        r = ReLU(h),        out = x + V r        (V: d x N, every column the same c),

with ``w_i = a u`` one measurement direction ``u`` (the mean pixel, or a random Gaussian direction) for every row and
``b_i = -a t_i`` the negated thresholds ``t_1 < ... < t_N`` (quantiles of the measurement's distribution). Row ``i``
fires for the inputs whose measurement ``u . x`` exceeds ``t_i``, so the gradient of a (mean) loss is

    dL/dw_i = sum_n s_n [u.x_n > t_i] x_n,      dL/db_i = sum_n s_n [u.x_n > t_i],      s_n = c . dL_n/d(out_n),

(the same ``s_n`` for every row, because every column of V is ``c``) and an input alone in its bin
``t_i < u.x_n <= t_{i+1}`` is the ratio of two differences (the paper's eq. 3 in bin form):

    x_n = (dL/dw_i - dL/dw_{i+1}) / (dL/db_i - dL/db_{i+1}).

The output keeps the input (``x + V r``, a skip connection, with ``a`` and ``c`` small) so the agreed model still
sees the image and the manipulation costs little accuracy; breaching's ``ImprintBlock`` instead sends ``V r`` alone
(its ``linear2`` of ones). Keys: ``<module>.linear0.weight`` (N, d), ``<module>.linear0.bias`` (N,),
``<module>.linear1.weight`` (d, N). Registered as the architecture change ``"imprint"``
(:mod:`fedsim.models.manipulation`): ``{"name": "imprint", "features": d, "bins": N}``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedsim.models.manipulation import ARCHITECTURE_CHANGES, added_module


class ImprintBlock(nn.Module):
    """``x -> x + V ReLU(W x + b)`` on the flattened input (see the module docstring); any input shape (B, ...)."""

    def __init__(self, features: int, bins: int) -> None:
        super().__init__()
        self.linear0 = nn.Linear(features, bins)
        self.linear1 = nn.Linear(bins, features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) with prod(...) = features -> the same shape."""
        flat = x.flatten(1)
        return (flat + self.linear1(torch.relu(self.linear0(flat)))).view_as(x)


def _route(name: str, model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the model's first argument passes through its ``name`` submodule first (a module-level
    function under ``functools.partial``, so the hooked model pickles and deep-copies)."""
    return (getattr(model, name)(args[0]), *args[1:])


@ARCHITECTURE_CHANGES.register("imprint")
def add_imprint(model: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """``model`` with an :class:`ImprintBlock` of ``description["bins"]`` rows on ``description["features"]`` inputs
    under ``description.get("module", "imprint")``, the input routed through it by a forward pre-hook. Raises
    ``ValueError`` on a missing or non-positive size or a module name the model already has."""
    name = added_module(description)
    features, bins = int(description.get("features", 0)), int(description.get("bins", 0))
    if features < 1 or bins < 1:
        raise ValueError(f"an imprint description needs positive 'features' and 'bins', got {dict(description)}")
    if hasattr(model, name):
        raise ValueError(f"the model already has a module or attribute {name!r}")
    model.add_module(name, ImprintBlock(features, bins))
    model.register_forward_pre_hook(functools.partial(_route, name))
    return model


def imprint_state(direction: Tensor, thresholds: Tensor, scale: float, gain: float) -> dict[str, Tensor]:
    """The block's weights for measurement ``direction`` (d,), ascending ``thresholds`` (N,) of ``direction . x``,
    row scale ``a = scale`` and every column of ``V`` equal to ``gain / N`` (keys relative to the block)."""
    bins = thresholds.numel()
    w = (scale * direction.float()).expand(bins, -1).clone()
    return {"linear0.weight": w, "linear0.bias": -scale * thresholds.float(),
            "linear1.weight": torch.full((direction.numel(), bins), gain / bins)}


def bin_differences(weight: Tensor, bias: Tensor, d_weight: Tensor, d_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The bins' differences, in ascending threshold order: ``(dW_i - dW_{i+1}, db_i - db_{i+1}, thresholds)``
    ((N, d), (N,), (N,); the last bin is its row alone). ``weight``/``bias`` are the rows the server sent (their
    thresholds ``-b_i / |w_i|`` order them, so a server may shuffle rows), ``d_weight``/``d_bias`` their gradient
    or update (any common scale: FedAvg's ``-lr`` cancels in the ratio)."""
    norms = weight.double().norm(dim=1).clamp_min(1e-30)
    thresholds = -bias.double() / norms
    order = torch.argsort(thresholds)
    dw, db = d_weight.double()[order], d_bias.double()[order]
    next_w = torch.cat([dw[1:], torch.zeros_like(dw[:1])])
    next_b = torch.cat([db[1:], torch.zeros_like(db[:1])])
    return dw - next_w, db - next_b, thresholds[order]
