"""Analytic recovery of the input of a fully connected first layer with bias (Phong, Aono, Hayashi, Wang, Moriai:
"Privacy-preserving deep learning via additively homomorphic encryption", IEEE TIFS 2018 / ATIS 2017, Sec. 3;
breaching's ``analytic`` attack). SoK threat model B: the update and the architecture, nothing else.

For a first layer ``h = W x + b`` on the flattened (normalized) input and a batch of ``B`` examples with mean loss,

    dL/dW_i = sum_n delta_{n,i} x_n,        dL/db_i = sum_n delta_{n,i},        delta_{n,i} = dL_n/dh_{n,i} / B,

so every row with ``dL/db_i != 0`` gives ``dL/dW_i / dL/db_i``, the average of the batch's inputs weighted by
``delta_{n,i}``.

* **Batch 1**: every such row is the input itself; the attack returns the least-squares combination of all rows,
  ``x = sum_i db_i dW_i / sum_i db_i^2`` (exact up to float rounding).
* **Batch > 1**: each row is a MIXTURE of the batch's inputs (weights ``delta_{n,i} / sum_n delta_{n,i}``, which
  may be negative); an input comes out alone only from a row where it is the only example with a non-zero
  ``delta`` (e.g. a ReLU unit only it activates). The attack returns ``B`` rows chosen greedily to be far apart
  (the largest ``|db|`` first, then the row farthest from those chosen): at most ``B`` distinct mixtures, often
  blends of several digits. ``update_rank`` in the stats (the numerical rank of ``[dW | db]``) is how many
  independent inputs the layer mixed: at most the batch size, and at most the layer's rows (``fc10``: 10).

FedSGD only (a FedAvg delta mixes several local steps at moving weights); the model's first layer with parameters
must be a ``Linear`` with bias on the flattened input (``fc10``; the ``mlp``'s layers have no bias and a
``convnet`` starts with a convolution): validation refuses others. No labels are recovered.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import to_pixels
from fedsim.attacks.victim import UpdateMismatchError, check_update, first_layer, rebuild_model
from fedsim.errors import ScenarioError
from fedsim.scenario import AttackSpec, Scenario
from fedsim.threat import ClientUpdate, ModelFacts, Reconstruction


class AnalyticFCParams(AttackParams):
    """Options of the analytic first-layer attack."""

    zero_tolerance: float = Field(1e-6, gt=0, lt=1, description="a row's bias gradient counts as zero below this "
                                  "share of the largest one")


def first_linear(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Linear] | str:
    """``(name, layer)`` of the model's first module with parameters when it is a ``Linear`` with bias on the
    flattened input (``prod(input_shape)`` features), else why not (one line)."""
    features = math.prod(int(s) for s in input_shape)
    found = first_layer(model)
    if found is None:
        return "the model has no layer with parameters"
    name, module = found[1][found[0]]
    if not isinstance(module, nn.Linear):
        return f"the model's first layer with parameters ({name}) is a {type(module).__name__}, not a Linear"
    if module.bias is None:
        return f"the model's first Linear ({name}) has no bias"
    if module.in_features != features:
        return f"the model's first Linear ({name}) takes {module.in_features} features, not the {features} inputs"
    return name, module


def spread_rows(candidates: Tensor, strength: Tensor, count: int) -> Tensor:
    """Indices of ``count`` rows of ``candidates`` (K, d): the largest ``strength`` first, then greedily the row
    farthest (Euclidean) from every row chosen so far."""
    chosen = [int(torch.argmax(strength))]
    dist = (candidates - candidates[chosen[0]]).norm(dim=1)
    while len(chosen) < min(count, candidates.shape[0]):
        dist[chosen] = -1.0
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, (candidates - candidates[nxt]).norm(dim=1))
    return torch.as_tensor(chosen)


@register_attack("analytic_fc")
class AnalyticFC(Attack):
    """The input of a fully connected first layer from its weight and bias gradients (exact at batch 1)."""

    Params = AnalyticFCParams
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd",)
    summary = "Analytic first-layer recovery (Phong et al. 2017): x = dL/dW_i / dL/db_i; exact at batch 1"
    min_iterations: ClassVar[int] = 0
    threat_model: ClassVar[str] = "B"
    assumes: ClassVar[tuple[str, ...]] = ("first layer fully connected with bias", "one example per update "
                                          "for exact recovery")

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """Refuse a model whose first layer is not a Linear with bias on the input, or a non-image task."""
        super().check_model(scenario, spec, facts)
        shape = tuple(facts.task.input_shape)
        found = first_linear(facts.model, shape)
        if isinstance(found, str):
            raise ScenarioError("model.name", f"{spec.name} reads the input from a fully connected first layer "
                                f"with bias: {found} (model {scenario.model.name}; use fc10)")
        if len(shape) != 3:
            raise ScenarioError("data.dataset", f"{spec.name} recovers images (C, H, W); this task's input is {shape}")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Batch 1: the input (least squares over the rows); batch B > 1: B far-apart row mixtures."""
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        try:
            model = rebuild_model(update.task, update.global_state)
        except UpdateMismatchError as err:
            return Reconstruction.failure(str(err))
        shape = tuple(int(s) for s in update.task.input_shape)
        found = first_linear(model, shape)
        if isinstance(found, str):
            return Reconstruction.failure(found)
        name = found[0]
        try:
            dw = torch.as_tensor(update.update[f"{name}.weight"]).double()
            db = torch.as_tensor(update.update[f"{name}.bias"]).double()
        except KeyError as err:
            return Reconstruction.failure(f"the update has no entry {err.args[0]!r}")
        rows = torch.nonzero(db.abs() > self.params.zero_tolerance * db.abs().max()).flatten()
        if rows.numel() == 0:  # it ran and isolated nothing: a measured zero, not a failure (Reconstruction's rule)
            return Reconstruction(images=torch.empty(0, *shape), labels=None,
                                  stats={"nothing_isolated": "every bias gradient of the first layer is zero"})
        batch = update.examples_to_reconstruct
        stacked = torch.cat([dw, db[:, None]], dim=1)
        rank = int(torch.linalg.matrix_rank(stacked / stacked.abs().max(), rtol=1e-6))
        if batch == 1:
            x = (db[rows, None] * dw[rows]).sum(0, keepdim=True) / (db[rows] ** 2).sum()
        else:
            candidates = dw[rows] / db[rows, None]
            x = candidates[spread_rows(candidates, db[rows].abs(), batch)]
        images = to_pixels(x.float().view(-1, *shape), update.task.mean, update.task.std)
        if progress is not None:
            progress(0, 0)
        stats = {"rows": float(db.numel()), "rows_nonzero": float(rows.numel()), "update_rank": float(rank),
                 "returned": float(images.shape[0]), "batch": float(batch), "exact": float(batch == 1),
                 "seconds": time.perf_counter() - start}
        return Reconstruction(images=images, labels=None, stats=stats)
