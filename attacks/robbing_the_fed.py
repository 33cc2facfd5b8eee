"""Robbing the Fed (Fowl, Geiping, Czaja, Goldblum, Goldstein; ICLR 2022): a malicious server inserts an imprint
block (:mod:`fedsim.attacks.imprint_block`) of ``bins`` rows in front of the agreed model and reads every input that
falls
alone in its bin back from the block's gradient, exactly, in closed form.

**Manipulation** (:meth:`RobbingTheFed.manipulate`). One measurement ``u . x`` of the normalized, flattened input:
``measurement: random`` (a unit Gaussian direction drawn from the attack's seed and the round) or ``mean`` (the mean
pixel, ``u`` = ones / sqrt(d)). Thresholds at the quantiles ``k / (N + 1)``, ``k = 1..N``, of its distribution, so
each bin holds an input with probability ``1 / (N + 1)`` (the mass below ``t_1`` is lost):

* ``thresholds: auxiliary`` (SoK letter G): the empirical quantiles of the measurement on the surrogate images
  (``knowledge.auxiliary_data``: the held-out test split); with fewer surrogate images than bins, the quantiles of
  a Gaussian fitted to their measurements;
* ``thresholds: prior`` (letter F, no data): the measurement of normalized pixels is taken as N(0, 1) (``prior:
  gaussian``) or a Laplace law of unit variance (``laplace``). For a unit random direction the variance is right on
  average (normalized pixels have unit variance); pixel means that are not 0 (MNIST's black border) shift it.

**Recovery** (:meth:`RobbingTheFed.reconstruct`): from ``update.global_state`` (the rows the server sent: thresholds
``-b_i / |w_i|``) and ``update.update``, ``x = (dW_i - dW_{i+1}) / (db_i - db_{i+1})`` for every bin whose bias
difference is not zero (relative to the largest bias entry, ``empty_tolerance``). A bin holding two or more inputs
gives their mixture weighted by each input's ``s_n``; a mixture whose pixels leave the box by more than
``box_tolerance`` is dropped (``rejected``), the rest are returned, at most the declared number of examples (the
largest bias differences first). Only recovered images come back, never blanks: the evaluator scores each missing
image against a gray guess (:mod:`fedsim.metrics.leakage`). No labels (the block carries none).

* FedSGD: exact (float64 ratio of float32 gradients) for every input alone in its bin.
* FedAvg (several local SGD steps): the update of each row is ``-lr`` times the sum of its gradients over the
  steps, so the same ratio gives ``sum_k s_n^k x_n / sum_k s_n^k = x_n`` as long as the input stays in its bin;
  the steps move the rows (``dW`` is added to them), which shifts bins by ``lr * |dW|`` - small with the small
  ``scale``/``gain`` defaults. SGD momentum keeps a positive sum; an optimizer with per-coordinate scaling (Adam)
  or weight decay breaks the ratio, and validation refuses both (``federation.local.optimizer`` / ``weight_decay``).
* SecAgg (``to_all: true``, every sampled client gets the block): the aggregate is a weighted sum of the clients'
  updates, each example's ``s_n`` only gains its client's weight, so every input alone in its bin across ALL
  clients is recovered from the aggregate (quantization noise adds ~1e-6 per entry: ``gain`` keeps the block's
  gradient well above it).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.base import AttackParams, ProgressFn, register_attack
from fedsim.attacks.imprint_block import bin_differences, imprint_state
from fedsim.attacks.inverting_gradients import from_pixels, to_pixels
from fedsim.attacks.local_sgd import sum_of_gradients_problem
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.attacks.victim import check_update
from fedsim.errors import ScenarioError
from fedsim.resources import memory_problem
from fedsim.scenario import AttackSpec, Knowledge, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, ManipulationView, ModelFacts, Reconstruction, ServerModel

MODULE = "imprint"
#: float32 bins x d matrices a client process holds at its peak (measured: 16384 bins took 1.7 GB of RSS on MNIST,
#: d = 784, and 4.0 GB on 32x32 colour images, d = 3072: ~15 copies over a ~0.9 GB base); validation's estimate.
COPIES = 16


class RobbingTheFedParams(AttackParams):
    """Robbing the Fed's options."""

    bins: int = Field(256, ge=2, le=16384, description="rows of the imprint block (bins of the measurement)")
    measurement: Literal["random", "mean"] = Field("random", description="the measured direction of the input")
    thresholds: Literal["auxiliary", "prior"] = Field(
        "auxiliary", description="quantiles from surrogate data (threat model G) or a known prior (F)")
    prior: Literal["gaussian", "laplace"] = Field("gaussian", description="the prior law of the measurement")
    scale: float = Field(0.1, gt=0, description="norm of each row (the block's input weights)")
    gain: float = Field(1.0, gt=0, description="sum of a row of V: how strongly the bins feed the model's input")
    # The input moves by about scale * gain (normalized units) and the block's gradient grows with gain: FedSGD
    # recovers the same inputs at any setting; FedAvg's deltas need gain / scale near 10 (float32 deltas of the
    # rows lose what is below ulp(scale); larger steps move the bins); SecAgg's quantization (step ~4e-6) needs a
    # large gain (100, with scale 0.001 to keep the input's shift small).
    to_all: bool = Field(False, description="send the block to every sampled client (SecAgg+ always does: false "
                         "is refused there)")
    empty_tolerance: float = Field(1e-5, gt=0, lt=1, description="a bin is empty below this share of the "
                                   "largest bias entry")
    box_tolerance: float = Field(0.05, ge=0, description="a recovered image may leave [0, 1] by this much")


def _quantiles(law: str, mean: float, std: float, levels: Tensor) -> Tensor:
    """``levels`` quantiles (float64) of a Gaussian or a Laplace law of this mean and standard deviation."""
    if law == "laplace":
        dist: torch.distributions.Distribution = torch.distributions.Laplace(mean, std / math.sqrt(2.0))
    else:
        dist = torch.distributions.Normal(mean, std)
    return dist.icdf(levels)


@register_attack("robbing_the_fed")
class RobbingTheFed(MaliciousAttack):
    """An imprint block of bins on one measurement of the input; exact recovery of every input alone in its bin."""

    Params = RobbingTheFedParams
    summary = "Robbing the Fed (Fowl et al., ICLR 2022): imprint block, closed-form recovery of inputs alone in a bin"
    threat_model: ClassVar[str] = "G"
    changes_architecture: ClassVar[bool] = True
    assumes: ClassVar[tuple[str, ...]] = ("modifies the architecture (inserts an imprint block)",
                                          "thresholds from auxiliary data or a prior of the measurement")

    @classmethod
    def threat_model_for(cls, params: AttackParams, knowledge: Knowledge) -> str:
        """G (data-enhanced manipulator) with ``thresholds: auxiliary``, F (active manipulator) with ``prior``."""
        return "G" if getattr(params, "thresholds", "auxiliary") == "auxiliary" else "F"

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: AttackSpec) -> None:
        """Also refuse local training that breaks the bin ratio (Adam, weight decay:
        :mod:`fedsim.attacks.local_sgd`)."""
        super().check_scenario(scenario, spec)
        problem = sum_of_gradients_problem(scenario, spec.name, scale=False)
        if problem is not None:
            raise problem

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """Refuse a task whose input is not an image (C, H, W): the recovered inputs are scored as images."""
        super().check_model(scenario, spec, facts)
        if len(tuple(facts.task.input_shape)) != 3:
            raise ScenarioError("data.dataset", f"{spec.name} recovers images (C, H, W); this task's input is "
                                f"{tuple(facts.task.input_shape)}")
        bins, features = cls.Params.model_validate(spec.params).bins, math.prod(facts.task.input_shape)
        problem = memory_problem(COPIES * 4 * bins * features, f"{bins} bins x {features} inputs make the imprint "
                                 f"block's two bins x d matrices, held ~{COPIES // 2} times over as float32 (weights, "
                                 "gradients, update, recovery)")
        if problem is not None:
            raise ScenarioError("params.bins", f"{problem}; lower bins")

    def _direction(self, view: ManipulationView, features: int) -> Tensor:
        if self.params.measurement == "mean":
            return torch.full((features,), 1.0 / math.sqrt(features), dtype=torch.float64)
        u = torch.randn(features, generator=torch_generator(self.seed, "imprint", view.round), dtype=torch.float64)
        return u / u.norm()

    def _thresholds(self, view: ManipulationView, direction: Tensor) -> tuple[Tensor, str]:
        """Ascending thresholds (N,) and where they came from, for the note."""
        n = self.params.bins
        levels = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        if self.params.thresholds == "prior":
            return _quantiles(self.params.prior, 0.0, 1.0, levels), f"a unit {self.params.prior} prior"
        if view.auxiliary is None:
            raise ValueError("thresholds: auxiliary needs surrogate images (knowledge.auxiliary_data: true)")
        aux = from_pixels(view.auxiliary.float(), view.task.mean, view.task.std).flatten(1).double()
        m = aux @ direction
        if m.numel() >= n:
            return torch.quantile(m, levels), f"{m.numel()} auxiliary images (empirical quantiles)"
        std = float(m.std()) if m.numel() > 1 else 1.0
        return (_quantiles("gaussian", float(m.mean()), max(std, 1e-6), levels),
                f"a Gaussian fitted to {m.numel()} auxiliary images")

    def manipulate(self, view: ManipulationView) -> ServerModel:
        """The honest state plus an imprint block under ``imprint.`` (see the module docstring)."""
        features = math.prod(int(s) for s in view.task.input_shape)
        direction = self._direction(view, features)
        thresholds, source = self._thresholds(view, direction)
        block = imprint_state(direction, thresholds, self.params.scale, self.params.gain)
        state = {k: v.clone() for k, v in view.global_state.items()}
        state.update({f"{MODULE}.{k}": v for k, v in block.items()})
        description = {"name": "imprint", "module": MODULE, "features": features, "bins": self.params.bins}
        note = (f"imprint block, {self.params.bins} bins on the {self.params.measurement} measurement, thresholds "
                f"from {source}")
        return ServerModel(state=state, architecture=(description,), to_all=self.params.to_all, note=note)

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Every input alone in its bin, ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})``, in pixel space."""
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        description = next((d for d in update.architecture if d.get("name") == "imprint"), None)
        if description is None:
            return Reconstruction.failure("the server sent no imprint block in this round (architecture "
                                          f"{[d.get('name') for d in update.architecture]})")
        module = str(description.get("module", "imprint"))
        keys = (f"{module}.linear0.weight", f"{module}.linear0.bias")
        missing = [k for k in keys if k not in update.global_state or k not in update.update]
        if missing:
            return Reconstruction.failure(f"the update or the state sent lacks {missing}")
        found = recover(update.global_state[keys[0]], update.global_state[keys[1]], update.update[keys[0]],
                        update.update[keys[1]], self.params.empty_tolerance)
        shape = tuple(int(s) for s in update.task.input_shape)
        images = to_pixels(found.inputs.float().view(-1, *shape), update.task.mean, update.task.std)
        raw = found.inputs.float().view(-1, *shape) * torch.tensor(update.task.std).view(1, -1, 1, 1)
        raw = raw + torch.tensor(update.task.mean).view(1, -1, 1, 1)
        tol = self.params.box_tolerance
        inside = ((raw >= -tol) & (raw <= 1 + tol)).flatten(1).all(dim=1)
        keep = torch.nonzero(inside).flatten()[: update.examples_to_reconstruct]
        stats: dict[str, float | str] = {"bins": float(found.bins), "bins_with_inputs": float(found.inputs.shape[0]),
                 "rejected_outside_box": float((~inside).sum()), "recovered": float(keep.numel()),
                 "batch": float(update.examples_to_reconstruct), "seconds": time.perf_counter() - start}
        if progress is not None:
            progress(0, 0)
        if keep.numel() == 0:  # ran, isolated nothing: a measured 0 of B (Reconstruction's rule), not a failure
            stats["nothing_isolated"] = (
                f"{found.bins} bins, none isolated an input: {found.inputs.shape[0]} non-empty, every one outside "
                "the pixel box (inputs mixed with opposite signs, or an update dominated by noise such as DP-SGD's)")
        return Reconstruction(images=images[keep], labels=None, stats=stats)


class Recovered:
    """The non-empty bins' inputs (normalized, (K, d) float64), ordered by |bias difference| descending."""

    def __init__(self, inputs: Tensor, weights: Tensor, bins: int) -> None:
        self.inputs, self.weights, self.bins = inputs, weights, bins


def recover(weight: Any, bias: Any, d_weight: Any, d_bias: Any, empty_tolerance: float) -> Recovered:
    """The bin-difference rule on the imprint rows ``weight`` (N, d), ``bias`` (N,) and their gradient or update
    ``d_weight``, ``d_bias``: one input per bin whose bias difference exceeds ``empty_tolerance`` times the largest
    ``|d_bias|`` entry (a mixture where several inputs share a bin)."""
    dw, db, _ = bin_differences(*(torch.as_tensor(t) for t in (weight, bias, d_weight, d_bias)))
    top = float(torch.as_tensor(d_bias).double().abs().max())
    full = torch.nonzero(db.abs() > empty_tolerance * max(top, 1e-300)).flatten()
    full = full[torch.argsort(db[full].abs(), descending=True)]
    return Recovered(dw[full] / db[full, None], db[full], int(db.numel()))
