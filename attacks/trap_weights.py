"""Trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot: "When the Curious Abandon Honesty:
Federated Learning Is Not Private", EuroS&P 2023), a weights-only manipulation of the first fully connected layer.

Manipulation (Sec. IV-B). Each neuron ``i`` of the first ``Linear`` gets a random row ``v_i`` acting on the PIXELS
``p`` (the layer sees normalized inputs ``x = (p - mu) / sigma``, so its weights are ``v_i * sigma`` and its bias
absorbs ``mu``): magnitudes ``|N(0, 1)|``, half of them negative, so the pre-activation ``v_i . p - tau_i`` is
positive for few inputs and the ReLU after the layer lets only those through. The threshold ``tau_i``:

* ``calibrate: auxiliary`` (SoK letter G, the paper's data-calibrated variant): the ``1 - active`` quantile of
  ``v_i . p`` over the auxiliary images, so each neuron fires for a fraction ``active`` of inputs (``active = 1/B``
  maximises the chance that exactly one input of a batch of ``B`` fires it);
* ``calibrate: none`` (letter F, data-free): ``tau_i = 0`` and the negative weights are scaled by ``scale > 1``
  (the paper's scaling factor), which pushes most pre-activations below zero.

Recovery (Sec. IV-A, the analytic rule of Phong et al.): when input ``n`` alone activates neuron ``i``, the
client's gradient of the mean loss gives ``dL/dW_i = delta_n x_n`` and ``dL/db_i = delta_n``, so
``x_n = (dL/dW_i) / (dL/db_i)`` exactly. A first layer without bias (``mlp``) has no ``dL/db_i``; with auxiliary
data the server then uses a pixel the auxiliary images show constant (an MNIST corner is always 0) as the bias:
its threshold is moved by that pixel's weight, and ``x_n = (dL/dW_i) * kappa / (dL/dW_i)[j0]`` with ``kappa`` the
pixel's normalized value (the layer's last neuron carries ``j0`` and the pixel's value to the recovery, so the attack
keeps no memory between the two calls). With ``match_norm`` the layer is rescaled to the honest layer's norm: a
positive factor changes neither which inputs fire a neuron nor the recovered ratio.

A candidate is kept only if it is consistent with the gradient: every neuron it would activate has a non-zero
gradient (a mixture of several inputs usually activates one no input did), its pixels lie in [0, 1], and no
candidate confirmed as a real input (caught by two or more neurons) also activates its neuron. Equal candidates are
merged, the most often caught first. FedSGD only: several local steps move the weights between the gradients.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import AttackParams, ProgressFn, register_attack
from fedsim.attacks.malicious import MaliciousAttack
from fedsim.attacks.victim import check_update, first_layer, rebuild_model
from fedsim.errors import ScenarioError
from fedsim.scenario import AttackSpec, Knowledge, Scenario
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, ManipulationView, ModelFacts, Reconstruction, ServerModel

BOX_TOLERANCE = 0.02  # pixels a float-exact recovery may leave [0, 1] by
SAME_IMAGE_MSE = 1e-5  # two candidates closer than this (pixel MSE) are one input caught twice


def first_linear(model: nn.Module) -> tuple[str, nn.Linear] | str:
    """``(name, layer)`` of the model's first ``nn.Linear`` when nothing with parameters precedes it and a ReLU
    follows it (norm and dropout aside); else the reason, in words, that trap weights cannot use it."""
    found = first_layer(model)
    if found is None:
        return "it has no Linear layer"
    k, modules = found
    name, module = modules[k]
    if not isinstance(module, nn.Linear):
        return (f"its first layer with weights is {type(module).__name__} ({name}), not a fully connected one: "
                "trap weights need a Linear first layer (model: mlp or fc10)")
    nxt = [m for _, m in modules[k + 1:] if not isinstance(m, nn.Identity | nn.Dropout)
           and type(m).__name__ != "MaskDropout"]
    if not nxt or not isinstance(nxt[0], nn.ReLU):
        after = type(nxt[0]).__name__ if nxt else "nothing"
        return (f"its first Linear layer is followed by {after}, not a ReLU (set model.activation: relu and "
                "model.norm: none)")
    return name, module


@register_attack("trap_weights")
class TrapWeights(MaliciousAttack):
    """Trap weights on the first fully connected layer, then exact recovery of every input alone on a neuron."""

    summary = "Trap weights (Boenisch et al. 2023): rare-firing first-layer neurons, exact recovery of lone inputs"
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd",)
    threat_model: ClassVar[str] = "G"
    assumes: ClassVar[tuple[str, ...]] = ("modifies only weights", "first layer fully connected, ReLU after it")
    changes_architecture: ClassVar[bool] = False
    min_iterations: ClassVar[int] = 0

    class Params(AttackParams):
        calibrate: Literal["auxiliary", "none"] = Field(
            "auxiliary", description="thresholds from auxiliary data (letter G) or the data-free scaling (F)")
        active: float | None = Field(None, gt=0, lt=1, description="fraction of inputs each neuron should fire "
                                     "for (auxiliary calibration); default 1 / local.batch_size")
        scale: float = Field(1.3, gt=0, description="factor on the negative weights (data-free calibration)")
        match_norm: bool = Field(True, description="rescale the layer to the honest layer's norm (a positive factor "
                                 "changes neither which inputs fire a neuron nor the recovery)")

    @classmethod
    def threat_model_for(cls, params: AttackParams, knowledge: Knowledge) -> str:
        """G with auxiliary calibration, F for the data-free variant."""
        return "G" if getattr(params, "calibrate", "auxiliary") == "auxiliary" else "F"

    @classmethod
    def check_model(cls, scenario: Scenario, spec: AttackSpec, facts: ModelFacts) -> None:
        """Refuse a model whose first layer is not a Linear followed by a ReLU, and a bias-free first layer
        without auxiliary calibration (its recovery needs a constant pixel in place of the bias)."""
        found = first_linear(facts.model)
        if isinstance(found, str):
            raise ScenarioError("model.name", f"trap_weights cannot attack this {facts.task.model.get('name')} model: "
                                f"{found}")
        params = cls.Params.model_validate(spec.params)
        if found[1].bias is None and params.calibrate != "auxiliary":
            raise ScenarioError("params.calibrate", "the first Linear layer has no bias, so recovery needs a "
                                "pixel the auxiliary data shows constant: use calibrate: auxiliary")

    # -- the manipulation ---------------------------------------------------------------------------------

    def manipulate(self, view: ManipulationView) -> ServerModel:
        """The honest model with the first Linear layer's weights (and bias) replaced by trap weights."""
        model = rebuild_model(view.task, view.global_state)
        found = first_linear(model)
        if isinstance(found, str):
            raise ValueError(f"trap_weights: {found}")
        name, layer = found
        mu, sigma = _channel_vectors(view.task, layer.in_features)
        gen = torch_generator(self.seed, "trap_weights", view.round)
        rows = torch.randn(layer.out_features, layer.in_features, generator=gen).abs()
        negative = torch.rand(layer.out_features, layer.in_features, generator=gen).argsort(dim=1)
        negative = negative < layer.in_features // 2
        state = {k: v.clone() for k, v in view.global_state.items()}
        note = ""
        if self.params.calibrate == "none":
            rows = torch.where(negative, -self.params.scale * rows, rows)
            tau = torch.zeros(layer.out_features)
            note = f"trap weights, negative half x{self.params.scale}, no data"
        else:
            rows = torch.where(negative, -rows, rows)
            if view.auxiliary is None or view.auxiliary.shape[0] < 2:
                raise ValueError("trap_weights: calibrate: auxiliary needs auxiliary images (knowledge.auxiliary_data)")
            aux = view.auxiliary.reshape(view.auxiliary.shape[0], -1).float()
            active = self.params.active or 1.0 / max(int(view.hyperparams.get("batch_size", 32)), 2)
            tau = torch.quantile(aux @ rows.T, 1.0 - active, dim=0)
            note = f"trap weights, each neuron firing for {active:.3g} of the auxiliary images"
        if layer.bias is not None:
            state[f"{name}.bias"] = (rows * mu).sum(dim=1) - tau
        else:
            j0, p0 = _constant_pixel(view.auxiliary.reshape(view.auxiliary.shape[0], -1).float(), mu)
            # fire iff v.p - v.mu > tau; moving v_j0 by d moves v.p - v.mu by d (p0 - mu_j0): d = tau / (mu_j0 - p0)
            rows[:, j0] += tau / (mu[j0] - p0)
            # the last neuron carries the stand-in pixel to the recovery, as a ratio (invariant to rescaling):
            # (p0 + 2) at j0 and 1 at the next pixel
            rows[-1] = 0.0
            rows[-1, j0] = p0 + 2.0
            rows[-1, (j0 + 1) % layer.in_features] = 1.0
            note += f"; pixel {j0} (value {p0:.3g}) stands in for the bias"
        state[f"{name}.weight"] = rows * sigma
        if self.params.match_norm:
            factor = float(layer.weight.detach().norm() / state[f"{name}.weight"].norm())
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state:
                    state[key] = state[key] * factor
        return ServerModel(state=state, note=note)

    # -- the recovery -------------------------------------------------------------------------------------

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        if update.task.protocol != "fedsgd":
            return Reconstruction.failure("trap_weights inverts FedSGD gradients only")
        try:
            model = rebuild_model(update.task, update.global_state)
        except ValueError as err:
            return Reconstruction.failure(str(err))
        found = first_linear(model)
        if isinstance(found, str):
            return Reconstruction.failure(f"trap_weights: {found}")
        name, layer = found
        mu, sigma = _channel_vectors(update.task, layer.in_features)
        weight = layer.weight.detach()
        g_w = torch.as_tensor(update.update[f"{name}.weight"]).double()
        if layer.bias is not None:
            bias = layer.bias.detach()
            g_b = torch.as_tensor(update.update[f"{name}.bias"]).double()
        else:
            bias = torch.zeros(layer.out_features)
            j0, kappa = _stand_in(weight, mu, sigma)
            g_b = g_w[:, j0].clone()
            g_b[-1] = 0.0  # the carrier neuron
        scale = g_b.abs().max()
        live = g_b.abs() > 1e-6 * scale if scale > 0 else torch.zeros_like(g_b, dtype=torch.bool)
        shape = tuple(int(s) for s in update.task.input_shape)
        if not bool(live.any()):  # ran, isolated nothing: a measured 0 of B (Reconstruction's rule), not a failure
            return Reconstruction(images=torch.empty(0, *shape), labels=None, stats={
                "live_neurons": 0.0, "recovered": 0.0, "seconds": time.perf_counter() - start,
                "nothing_isolated": f"{layer.out_features} neurons, none has a gradient: no input activated a trap"})
        if layer.bias is not None:
            x = g_w[live] / g_b[live, None]
        else:
            x = g_w[live] * kappa / g_b[live, None]  # x_j0 = kappa for every input
        pixels = (x.float() * sigma + mu)
        fires = (x.float() @ weight.T + bias) > 0  # (candidates, neurons)
        consistent = ~(fires & ~live).any(dim=1)
        in_box = (pixels.amin(dim=1) > -BOX_TOLERANCE) & (pixels.amax(dim=1) < 1 + BOX_TOLERANCE)
        ok = consistent & in_box
        sources = torch.nonzero(live).flatten()[ok]
        distinct = _lone_inputs(pixels[ok].clamp(0, 1), fires[ok], sources)
        images = distinct[: max(int(update.num_examples), 0)]
        stats: dict[str, float | str] = {"live_neurons": float(live.sum()), "candidates": float(ok.sum()),
                                          "distinct": float(distinct.shape[0]), "recovered": float(images.shape[0]),
                                          "seconds": time.perf_counter() - start}
        if images.shape[0] == 0:  # ran, isolated nothing: a measured 0 of B, not a failure
            stats["nothing_isolated"] = (f"{int(live.sum())} of {layer.out_features} neurons fired, none for a "
                                         "single input")
        return Reconstruction(images=images.reshape(images.shape[0], *shape), labels=None, stats=stats)


def _channel_vectors(task, features: int) -> tuple[Tensor, Tensor]:
    """Per flat input feature, the normalization's mean and std (channel-major flattening of (C, H, W))."""
    channels = len(task.mean)
    per = features // channels
    mu = torch.tensor(task.mean, dtype=torch.float32).repeat_interleave(per)
    sigma = torch.tensor(task.std, dtype=torch.float32).repeat_interleave(per)
    return mu, sigma


def _constant_pixel(aux: Tensor, mu: Tensor) -> tuple[int, float]:
    """The flat pixel whose auxiliary values vary least relative to their distance from the channel mean, and
    its mean value: it stands in for a bias."""
    mean, std = aux.mean(dim=0), aux.std(dim=0)
    j0 = int(((mean - mu).abs() / (std + 1e-6)).argmax())
    return j0, float(mean[j0])


def _stand_in(weight: Tensor, mu: Tensor, sigma: Tensor) -> tuple[int, float]:
    """The stand-in pixel ``j0`` and its normalized value ``kappa``, read back from the carrier (last) neuron."""
    carrier = weight[-1] / sigma
    j0 = int(carrier.abs().argmax())
    p0 = float(carrier[j0] / carrier[(j0 + 1) % carrier.numel()]) - 2.0
    return j0, (p0 - float(mu[j0])) / float(sigma[j0])


def _lone_inputs(images: Tensor, fires: Tensor, sources: Tensor) -> Tensor:
    """The candidates ``images`` (N, D) (candidate ``c`` read from neuron ``sources[c]``; ``fires`` (N, neurons):
    which neurons it would activate) that are lone inputs, near-duplicates (pixel MSE < SAME_IMAGE_MSE) merged,
    those caught by the most neurons first.

    A candidate caught by two or more neurons is surely a real input (a mixture is not repeated); a candidate
    whose source neuron such a confirmed input also activates cannot be a lone input there (two inputs fired
    it), so it is a mixture and dropped."""
    if images.shape[0] == 0:
        return images
    close = torch.cdist(images, images).pow(2) / images.shape[1] < SAME_IMAGE_MSE  # (N, N)
    confirmed = close.sum(dim=1) >= 2
    fires_source = fires[:, sources]  # [c', c]: candidate c' activates the neuron candidate c came from
    contradicted = (fires_source & confirmed[:, None] & ~close).any(dim=0)
    keep = ~contradicted
    images, close = images[keep], close[keep][:, keep]
    order = torch.argsort(close.sum(dim=1), descending=True, stable=True)
    kept: list[int] = []
    for i in order.tolist():
        if not any(bool(close[i, k]) for k in kept):
            kept.append(i)
    return images[kept]
