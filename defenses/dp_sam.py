"""DP-SAM: the naive private sharpness-aware minimization, the baseline DP-SAT improves on (spec
``shared/reference/algorithms-more.md`` section 10.1; Park et al., ICML 2023).

Two private gradient queries on each Poisson batch B_t, both clipped and noised as DP-SGD does:

1. ascent: ``g~_asc`` privatized at ``w_t``; ``e_t = rho * g~_asc / ||g~_asc||_2`` (global L2 norm);
2. descent: ``g~_t`` privatized at ``w_t + e_t`` on the same batch; ``w_t`` restored exactly
   (:class:`fedsim.defenses.sharpness.Perturbation`) and the base optimizer steps with ``g~_t`` (fedsgd sends it).

Privacy. Each step releases two Gaussian queries of noise multiplier sigma on ONE Poisson sample.
Gaussians compose exactly (mu = 1/sigma adds in quadrature), so the pair is one Gaussian of
sigma / sqrt(2), and the step one Poisson-subsampled Gaussian of sigma / sqrt(2): that is what the
accountant counts (``steps`` = logical steps, ``noise_multiplier`` = sigma / sqrt 2, ``queries`` = 2 per
step, ``query_noise_multiplier`` = sigma), and ``target_epsilon`` solves sigma / sqrt 2 over the planned
steps. Counting the two queries as two independently subsampled Gaussians of sigma (2 x the steps)
would UNDERSTATE epsilon, as the two queries share the sample (e.g. q = 0.01, sigma = 1, 100 steps,
delta 1e-5: 3.06 by this accounting, dp_accounting's RDP of the sampled pair, against 1.34 for 200
independent steps). Either way DP-SAM spends more than DP-SGD at the same sigma, and needs sqrt(2) x
DP-SGD's sigma per query for the same epsilon; and it computes per-example gradients twice.

How it sits on the DP-SGD round: the batch the step's forward pass and loss saw are kept; at the
end of the ascent ``pre_step`` (the accountant's step hook) the perturbation is applied, the gradients
cleared, forward and backward run again on that batch (through the same per-sample machinery: hooks,
functorch, ew or ghost) and ``pre_step`` privatizes the descent gradient; then ``w_t`` is restored.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from fedsim.defenses.base import register_defense
from fedsim.defenses.dp_sgd import DPSGD, DPSGDParams, _PrivateRound
from fedsim.defenses.sharpness import Perturbation, flat
from fedsim.training import TrainingJob


class DPSAMParams(DPSGDParams):
    rho: float = Field(0.03, ge=0, description="perturbation radius, absolute in parameter space (L2)")


class _SAMRound(_PrivateRound):
    """A DP-SGD round with two private queries per step: ascent at w, descent at w + e (module doc)."""

    def __init__(self, defense: DPSAM, job: TrainingJob) -> None:
        super().__init__(defense, job)
        self.perturbation = Perturbation([p for p in self.model.parameters() if p.requires_grad])
        self.descending = False
        self.batch: tuple[Tensor, Tensor | None] | None = None

    def before_forward(self, x: Tensor) -> None:
        if not self.descending:
            self.batch = (x, None)

    def loss_fn(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not self.descending and self.batch is not None:
            self.batch = (self.batch[0], labels)
        return super().loss_fn(logits, labels)

    def account_query(self, optimizer: Any) -> None:
        if self.descending:  # the step's pair of queries: one subsampled Gaussian of sigma / sqrt(2)
            self.accountant.step(noise_multiplier=self.accounted_sigma, sample_rate=self.q)

    def after_privatize(self, optimizer: Any) -> None:
        if self.descending:
            return  # the descent query's own pre_step: the ascent hook below restores w
        if self.batch is None or self.batch[1] is None:
            raise RuntimeError("dp_sam: the step's batch was not seen by its forward pass and loss")
        x, labels = self.batch
        self.perturbation.apply(flat([p.grad for p in self.perturbation.params]), self.p.rho)  # g~_asc
        self.descending = True
        try:
            optimizer.zero_grad(set_to_none=True)
            self.loss_fn(self.forward(x), labels).backward()
            optimizer.pre_step()  # privatize the descent gradient at w + e: p.grad = g~_t
        finally:
            self.descending = False
            self.perturbation.remove()
            self.batch = None

    def on_round_end(self) -> dict[str, float]:
        return {"queries": float(self.defense.queries_per_step * self.steps), "query_noise_multiplier": self.sigma}


@register_defense("dp_sam")
class DPSAM(DPSGD):
    Params = DPSAMParams
    summary = "DP-SAM (naive private SAM): two private gradient queries per step, ascent and descent"
    round_class = _SAMRound
    queries_per_step = 2
