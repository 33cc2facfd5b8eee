"""Soteria: perturb the data representation behind the fully-connected layer (Sun, Li, Wang, Ramage,
Tan, Chen, Li; CVPR 2021, "Soteria: Provable Defense Against Privacy Leakage in Federated Learning
from Representation Perspective"), as ported in GGL/GIFD ``defense.py``.

Let ``r`` be the input of the model's classifier (its last ``nn.Linear``, see
:mod:`fedsim.defenses.model_surgery`) on the client's batch ``x``. For every feature i the client computes
``score_i = sum_b ||d r_{b,i} / d x_b|| / |r_{b,i}|``; the features with the smallest scores are the
ones whose removal perturbs the reconstruction most (the paper's bound uses ``||r_i|| / ||dr_i/dx||``),
so their columns of the classifier's weight gradient ``dL/dW = delta r^T`` are set to zero.
``percent`` (default 10, GIFD's ResNet-18 setting) is the share of features pruned.

Choices where the reference code is silent or fragile (documented for reproducibility):

* The percentage applies to the *active* features: a feature with ``r_{b,i} = 0`` for every example
  (a dead ReLU) already has an all-zero gradient column, so pruning it would protect nothing
  (in the reference code ``0/0 = NaN`` makes the percentile NaN and then nothing is pruned at all).
  ``round(percent/100 * active)`` active features with the smallest scores are pruned.
* Per example, features with ``r_{b,i} = 0`` contribute nothing to the sum (instead of 0/0).
* The Jacobian rows are computed in batched backward passes (``is_grads_batched``), falling back to
  one backward per feature where an operator has no batching rule.

The mask needs the client's batch and model, so Soteria works through ``wrap_training``: forward
hooks compute the mask during the client's own forward pass (so dropout masks are drawn once) and
the job's ``before_read_gradients`` hook prunes the gradient just before fedsgd reads it. Only
FedSGD is supported (the paper's mask is defined for one batch's gradient); FedAvg is refused in
``check_scenario``. The mask depends on private data, so there is no ``attacker_transform``; an
attacker can read the pruned columns off the received update (they are exactly zero).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.defenses.base import Defense, DefenseParams, register_defense
from fedsim.defenses.dp_sgd import is_opacus_defense
from fedsim.defenses.model_surgery import last_linear
from fedsim.errors import IncompatibleDefenseError
from fedsim.scenario import DefenseSpec, Scenario
from fedsim.training import TrainingJob

MAX_CHUNK = 64  # features per batched backward (bounds the vmapped activations' memory)


class SoteriaParams(DefenseParams):
    percent: float = Field(10.0, ge=0, le=100, description="share (%) of active fc-input features pruned")


def feature_scores(x: Tensor, r: Tensor) -> Tensor:
    """``sum_b ||d r_{b,i}/d x_b|| / |r_{b,i}|`` per feature i of ``r`` (B, d); ``x`` must require grad
    and ``r`` be computed from it. Features inactive on every example score +inf."""
    batch, d = r.shape
    norms = torch.empty(d, batch, dtype=r.dtype, device=r.device)
    chunk = min(d, MAX_CHUNK)
    try:
        for start in range(0, d, chunk):
            idx = torch.arange(start, min(start + chunk, d), device=r.device)
            seeds = torch.zeros(len(idx), batch, d, dtype=r.dtype, device=r.device)
            seeds[torch.arange(len(idx)), :, idx] = 1.0
            (jac,) = torch.autograd.grad(r, x, seeds, retain_graph=True, is_grads_batched=True)
            norms[idx] = jac.flatten(2).norm(dim=2)
    except RuntimeError:  # an operator without a vmap rule: one backward per feature
        for i in range(d):
            seed = torch.zeros_like(r)
            seed[:, i] = 1.0
            (jac,) = torch.autograd.grad(r, x, seed, retain_graph=True)
            norms[i] = jac.flatten(1).norm(dim=1)
    values = r.detach().abs().T  # (d, B)
    ratio = torch.where(values > 0, norms / values.clamp_min(torch.finfo(values.dtype).tiny), 0.0)
    scores = ratio.sum(dim=1)
    return torch.where((values > 0).any(dim=1), scores, torch.inf)


def soteria_mask(scores: Tensor, percent: float) -> Tensor:
    """1 for kept features, 0 for the ``round(percent% of active)`` lowest-scoring active features."""
    mask = torch.ones_like(scores)
    active = torch.isfinite(scores)
    k = int(round(percent / 100.0 * int(active.sum())))
    if k > 0:
        mask[torch.topk(scores, k, largest=False).indices] = 0.0
    return mask


class _SoteriaHooks:
    """Forward hooks on one client's model: make the input a leaf that requires grad, and compute the
    mask when the classifier sees its input ``r``; ``prune`` then zeroes the classifier gradient."""

    def __init__(self, model: nn.Module, percent: float) -> None:
        self.percent = percent
        self.x: Tensor | None = None
        self.mask: Tensor | None = None
        _, self.fc = last_linear(model)
        model.register_forward_pre_hook(self._on_input)
        self.fc.register_forward_pre_hook(self._on_representation)

    def _on_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        self.x = args[0].detach().requires_grad_(True)
        return (self.x, *args[1:])

    def _on_representation(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        r = args[0]
        if self.x is None or not r.requires_grad:
            return
        if r.dim() != 2:
            raise IncompatibleDefenseError(f"soteria needs a (batch, features) classifier input, got {tuple(r.shape)}")
        self.mask = soteria_mask(feature_scores(self.x, r), self.percent)
        self.x = None

    def prune(self) -> float:
        """Zero the pruned columns of the classifier's weight gradient; returns the pruned share."""
        if self.mask is None or self.fc.weight.grad is None:
            return 0.0
        self.fc.weight.grad.mul_(self.mask.to(self.fc.weight.grad.dtype))
        return float(1.0 - self.mask.mean())


@register_defense("soteria")
class Soteria(Defense):
    Params = SoteriaParams
    stage = 50  # it perturbs what is sent, like the other update perturbations
    summary = "prunes the classifier-gradient columns of the fc-input features most revealing of x"
    inputs = ("image", "tabular")
    inputs_reason = ("its feature scores are derivatives of the representation with respect to the input, and "
                     "token ids have none")

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        if scenario.federation.protocol != "fedsgd":
            raise IncompatibleDefenseError(
                "soteria prunes one batch's gradient and supports only federation.protocol: fedsgd"
            )
        if sum(d.name == spec.name for d in scenario.defenses) > 1:
            raise IncompatibleDefenseError("soteria can appear once: a second set of hooks would score the "
                                           "features of an input the first one has already replaced")
        dp = [d.name for d in scenario.defenses if is_opacus_defense(d.name)]  # dp_sgd, dp_sat, dp_sam
        if dp:
            raise IncompatibleDefenseError(
                f"soteria cannot be combined with {dp[0]}: its pruning mask is computed from the raw private batch, "
                "outside DP-SGD's accountant (the update sent would no longer be the DP one), and its extra "
                "backward passes would be recorded by Opacus's per-sample hooks"
            )

    def wrap_training(self, job: TrainingJob) -> TrainingJob:
        hooks = _SoteriaHooks(job.model, self.params.percent)
        previous = job.before_read_gradients
        pruned: list[float] = []

        def before_read_gradients(optimizer: torch.optim.Optimizer) -> None:
            if previous is not None:
                previous(optimizer)  # e.g. a DP optimizer's pre_step: Soteria prunes what would be sent
            pruned.append(hooks.prune())

        job.before_read_gradients = before_read_gradients
        job.on_finish.append(lambda steps, sizes: {"soteria_pruned_fraction": pruned[-1] if pruned else 0.0})
        return job
