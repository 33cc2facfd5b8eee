"""``audit:``: one-run empirical privacy auditing of a scenario's DP mechanism (issue 15).

The block inserts ``canaries`` random canaries into the SAME federation, each included with probability 1/2 by
the scenario's seed (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023), and
scores every canary by the cosine between its direction and what the DP guarantee covers: the released global
models (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot empirical privacy estimation for federated
learning", arXiv 2302.03098, ICLR 2024). From the scores of the included and the left-out canaries fedsim computes
an empirical epsilon lower bound at ``confidence`` (Steinke et al.) and a Gaussian-fit estimate with its
confidence interval (Andrew et al.), printed beside the accountants' epsilon (:mod:`fedsim.audit.canaries`,
:mod:`fedsim.audit.estimators`).

``level``: ``example`` canaries are records inside the clients' sample-level DP (dp_sgd, dp_sat, dp_sam, diff2): a
record whose loss is linear, so its gradient is the constant ``10 C c_j`` whatever the model (c_j a unit direction),
which the mechanism's own per-example clipping brings to C, the clipping norm (ghost clipping: added as ``C c_j``
after the clip); ``client`` canaries are honest clients whose model update is ``10 C c_j`` (C the round's clipping
norm; 1.0 without one), replies that the server clips, weighs and noises like any other (central DP, secure
aggregation, or no DP at all: :mod:`fedsim.audit.client_canaries`). ``auto`` picks ``example`` under a
sample-level DP defense, else ``client``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsim.spec_base import _Strict

AUDIT_LEVELS = ("auto", "example", "client")


class AuditSpec(_Strict):
    """The ``audit:`` block of a scenario (absent: no canaries, nothing audited)."""

    canaries: int = Field(1000, ge=20, le=100_000, description="canaries m, each included with probability 1/2")
    level: Literal["auto", "example", "client"] = Field(
        "auto", description="example: records in sample-level DP clients; client: canary clients")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence of the lower bound and the interval")
    client_norm: float | None = Field(
        None, gt=0, description="client canaries: norm of their update before any clipping (default: 10 x "
        "central_dp's clipping norm of the round, else 1.0)")
    baseline: bool = Field(True, description="fedsim audit also runs the scenario without canaries, to report "
                           "their effect on utility")
