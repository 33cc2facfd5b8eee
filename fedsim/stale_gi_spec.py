"""``federation.staleness.gi``: the settings of the server's gradient-inversion conversion of stale updates.

Wang & Gao, AAAI 2025 (spec ``algorithms-more.md`` §12.2, §12.4): the server inverts a stale update into
``num_estimates`` inputs and soft labels, recomputes the update from the current model on them and mixes it with
the stale one by ``lambda_t``. The authors run 40,000 Adam iterations on 256 estimates; §12.6 sizes CI at 16-64
estimates and 500-2000 iterations, and this default is smaller still (a CPU budget per stale arrival).
Used only with ``aggregation: gi_conversion`` (:mod:`fedsim.simulation.stale_gi` says what each setting does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GIConversion(BaseModel):
    """Inversion budget, objective and the lambda_t schedule (spec §12.2 A, B, D)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_estimates: int = Field(16, ge=1, description="N_rec: inputs (with soft labels) the server estimates")
    iterations: int = Field(100, ge=1, description="Adam steps of one inversion (each unrolls the E local steps)")
    lr: float = Field(0.1, gt=0, description="Adam step size on the estimate (inputs signed, labels plain)")
    topk: float = Field(0.05, gt=0, le=1, description="fraction of the update's largest entries the L1 matches")
    init: Literal["normal", "gray"] = Field(
        "normal", description="cold start of the inputs: N(0, 1) (the authors) or the dataset-mean gray image + "
        "N(0, 0.1^2) noise (normalized space; a data-free prior)")
    tv: float = Field(0.0, ge=0, description="weight of the total-variation prior on image estimates (authors: 0)")
    warm_start: bool = Field(True, description="start from this client's previous estimate (its data is fixed)")
    mix: Literal["hard", "decay"] = Field(
        "hard", description="lambda_t: 1 before the switch round s, then 0 (hard) or gamma^(t-s) (decay)")
    gamma: float = Field(0.9, gt=0, lt=1, description="decay factor of lambda_t after the switch")
    switch_round: int | None = Field(None, ge=1, description="switch at this round at the latest (code: switch_max)")
    drift_threshold: float | None = Field(
        None, gt=0, description="detector: switch once |w^{t-1} - w^{t-1-tau}| / |w^{t-1}| falls below this")
