"""MID: Mutual Information regularized Defense (Wang, Zhang, Jia; AAAI 2021, "Improving Robustness
to Model Inversion Attacks via Mutual Information Regularization"), i.e. a variational information
bottleneck (VIB; Alemi, Fischer, Dillon, Murphy; ICLR 2017) in front of the classifier.

``transform_model`` (stage 10) replaces the classifier, the model's last ``nn.Linear(d -> classes)``
(see :mod:`fedsim.defenses.model_surgery`), by :class:`VIBClassifier`: ``encoder = Linear(d -> 2K)`` with
K = d // 2 by default, ``mu`` = its first K outputs, ``sigma = softplus(s - 5)`` from the last K,
``z = mu + sigma * eps`` with ``eps ~ N(0, I)``, then ``decoder = Linear(K -> classes)``. As in the
official code, z is sampled in train *and* eval mode: the released model is stochastic. ``eps`` comes
from the global torch RNG, which the client seeds per (seed, round, partition) before training and the
server seeds per (seed, round) before evaluating, so runs are reproducible.

``wrap_training`` makes the client's loss ``CE + beta * KL(N(mu, sigma^2) || N(0, I))`` with
``KL = -1/2 sum_k (1 + 2 log(sigma_k + 1e-7) - mu_k^2 - sigma_k^2)``, averaged over the batch
(beta = 1e-2: the official update-leak experiment and the MI toolbox default). The new layers' initial
weights are seeded from the weights of the layer they replace, so the global model is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedsim.defenses.base import Defense, DefenseParams, register_defense
from fedsim.defenses.model_surgery import last_linear, replace_submodule, weight_seed
from fedsim.errors import IncompatibleDefenseError
from fedsim.training import TrainingJob

SIGMA_SHIFT = 5.0  # sigma = softplus(s - 5): the bottleneck starts almost deterministic
LOG_EPS = 1e-7


class MIDParams(DefenseParams):
    beta: float = Field(1e-2, ge=0, description="weight of the KL (information) term")
    bottleneck_dim: int | None = Field(None, ge=1, description="K; default d // 2 for a d-feature classifier input")


class VIBClassifier(nn.Module):
    """``Linear(d -> 2K)`` -> sample ``z = mu + sigma * eps`` (always) -> ``Linear(K -> classes)``.

    With ``keep_stats`` on, the last forward's ``mu`` and ``sigma`` are kept (with their graph) for the
    KL term; off by default so that no graph outlives a forward pass in evaluation or in an attack.
    """

    def __init__(self, in_features: int, num_classes: int, k: int, bias: bool = True) -> None:
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(in_features, 2 * k)
        self.decoder = nn.Linear(k, num_classes, bias=bias)
        self.keep_stats = False
        self.last_mu: Tensor | None = None
        self.last_sigma: Tensor | None = None

    def forward(self, h: Tensor) -> Tensor:
        stats = self.encoder(h)
        mu, s = stats[..., : self.k], stats[..., self.k :]
        sigma = F.softplus(s - SIGMA_SHIFT)
        z = mu + sigma * torch.randn_like(sigma)
        if self.keep_stats:
            self.last_mu, self.last_sigma = mu, sigma
        return self.decoder(z)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def kl_divergence(mu: Tensor, sigma: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) summed over the bottleneck: averaged over the batch (``mean``),
    summed (``sum``) or one value per example (``none``, shape (B,))."""
    per_example = -0.5 * (1 + 2 * torch.log(sigma + LOG_EPS) - mu.pow(2) - sigma.pow(2)).sum(dim=-1)
    return _reduce(per_example, reduction)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()


def vib_layers(model: nn.Module) -> list[VIBClassifier]:
    return [m for m in model.modules() if isinstance(m, VIBClassifier)]


@register_defense("mid")
class MID(Defense):
    Params = MIDParams
    stage = 10
    summary = "variational information bottleneck before the classifier, CE + beta*KL loss (Wang et al. 2021)"
    model_params = ("bottleneck_dim",)  # beta shapes the loss, not the model

    def transform_model(self, model: nn.Module) -> nn.Module:
        name, fc = last_linear(model)
        k = self.params.bottleneck_dim or fc.in_features // 2
        if k < 1:
            raise IncompatibleDefenseError(f"mid: a classifier input of {fc.in_features} feature(s) is too small")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weight_seed(fc.weight, "mid", k))
            head = VIBClassifier(fc.in_features, fc.out_features, k, bias=fc.bias is not None)
        head.to(device=fc.weight.device, dtype=fc.weight.dtype).train(fc.training)
        return replace_submodule(model, name, head)

    def wrap_training(self, job: TrainingJob) -> TrainingJob:
        heads = vib_layers(job.model)
        if not heads:
            raise IncompatibleDefenseError("mid: the model has no VIB head (was transform_model applied?)")
        head = heads[-1]
        head.keep_stats = True
        beta, inner = self.params.beta, job.loss_fn

        def loss_fn(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
            # ``reduction`` as in F.cross_entropy: DP-SGD's ghost clipping asks for per-example losses
            # ("none"); the KL term is per example too, so each example's loss stays its own
            loss = inner(logits, labels) if reduction == "mean" else inner(logits, labels, reduction=reduction)
            mu, sigma = head.last_mu, head.last_sigma
            head.last_mu = head.last_sigma = None
            if beta == 0 or mu is None or sigma is None:
                return loss
            return loss + beta * kl_divergence(mu, sigma, reduction)

        job.loss_fn = loss_fn
        return job
