"""The ``zeroth_order`` scenario block: a federation whose clients can only query their private objective's values
(used with ``federation.protocol: zeroth_order``). Defaults are the FZooS authors' (spec §11.5, §11.7) except where
a description says it was shrunk for CPU.

Paths in errors are relative to this block (the Scenario prefixes ``zeroth_order.``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from fedsim.yaml_literal import yaml_literal

ZO_METHODS = ("fzoos", "fedzo", "fedprox", "scaffold1", "scaffold2")
MAX_POINTS = 100_000  # sizes beyond it (d, M, candidates) make a (d x M) or (n x d) float64 array of many GB
ZO_METHOD_SUMMARIES = {  # one line each, for ``fedsim list``
    "fzoos": "FZooS: local GP surrogate steps corrected by the shared-RFF global surrogate (Shu et al. 2023)",
    "fedzo": "FedZO: local Adam on RGF finite-difference gradient estimates",
    "fedprox": "RGF estimates plus FedProx's prox_mu (x - x_r) term",
    "scaffold1": "RGF estimates plus SCAFFOLD type I control variates (a fresh estimate at x_{r+1})",
    "scaffold2": "RGF estimates plus SCAFFOLD type II control variates (the round's mean estimate)",
}


def _gamma(value: Any) -> Any:
    """'decay' or a finite number >= 0, one message for both forms (not pydantic's per-member union errors)."""
    if value == "decay" and isinstance(value, str):
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; pydantic's float fields coerce it too
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"give 'decay' (gamma_t = 1/(t+1)) or a finite number >= 0, got {value!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"give 'decay' (gamma_t = 1/(t+1)) or a finite number >= 0, got {value!r}")


Gamma = Annotated[Literal["decay"] | float, BeforeValidator(_gamma)]


def _number(value: Any) -> Any:
    """Refuse a boolean where a number belongs (pydantic would read true as 1 and false as 0), saying that YAML 1.1
    reads a bare on/off/yes/no/true/false as one."""
    if isinstance(value, bool):
        raise ValueError(f"give a number, got {str(value).lower()} (YAML reads a bare on/off/yes/no/true/false as "
                         f"the boolean {str(value).lower()})")
    return value


def _flag(value: Any) -> Any:
    """Refuse a number where true/false belongs (pydantic would read 1 as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"give true or false, got {value!r}")
    return value


Count = Annotated[int, BeforeValidator(_number)]
OptCount = Annotated[int | None, BeforeValidator(_number)]
Num = Annotated[float, BeforeValidator(_number)]
OptNum = Annotated[float | None, BeforeValidator(_number)]
Flag = Annotated[bool, BeforeValidator(_flag)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ZOTask(_Strict):
    """Which black-box task family (``fedsim.zo.tasks``) and its size. Fields a family does not use are refused by
    the family's check (e.g. ``class_portion`` for ``quadratic``)."""

    family: Literal["quadratic", "metric", "adversarial"] = "quadratic"
    dim: OptCount = Field(None, ge=1, le=MAX_POINTS, description="quadratic: d (default 300); others: set by "
                                                                  "the task; at most 1e5 (see MAX_POINTS)")
    heterogeneity: Num = Field(0.5, ge=0, le=100, description="quadratic: 'div' of the Dirichlet coefficients "
                                 "(§11.7); at most 100 (beyond N it only makes coordinates concave, and huge values "
                                 "overflow f_i)")
    dataset: str | None = Field(None, description="metric / adversarial: bundled dataset (digits, mnist-5k)")
    class_portion: Num = Field(0.9, gt=0, le=1, description="share of a client's data from its own classes")
    metric: Literal["f1", "precision", "recall", "jaccard"] = Field(
        "f1", description="metric family: f_i = 1 - macro-<metric> of the perturbed classifier on client data")
    box: OptNum = Field(None, gt=0, le=1e4, description="half-width of the perturbation box (metric 0.2, "
                                      "adversarial 0.3 as in the paper); at most 1e4 (the classifier's weights are "
                                      "O(1): far beyond, the shift alone decides and float64 overflows near 1e308; "
                                      "the adversarial task allows 1: pixels lie in [0, 1])")
    image_index: Count = Field(0, ge=0, description="adversarial: which eligible test image (F(x0) >= 0) to attack")


class FZooSSettings(_Strict):
    """FZooS's surrogate and query settings (spec §11.2-§11.5)."""

    n_inits: Count = Field(10, ge=1, le=MAX_POINTS, description="uniform queries in x0 +- explore_radius at the "
                                                              "start")
    gp_points: Count = Field(150, ge=2, description="history points nearest x the GP is fitted on")
    gp_restarts: Count = Field(2, ge=0, description="optimizer restarts of the GP length-scale fit (authors: 20; "
                                                  "shrunk for CPU)")
    explore_radius: Num = Field(0.01, gt=0, le=1, description="half-width of the exploration box around x; at "
                                                                 "most 1 (points lie in [0, 1]^d)")
    explore_candidates: Count = Field(100, ge=1, le=MAX_POINTS,
                                    description="uniform candidates per local step explore_top is chosen from")
    explore_top: Count = Field(5, ge=0, description="queries per local step with the largest gradient variance "
                                                  "(at most explore_candidates)")
    rff_features: Count = Field(10_000, ge=1, le=MAX_POINTS, description="M: random Fourier features (shared by "
                                                                       "seed); at most 1e5 (the basis is d x M)")
    rff_lengthscale: Num = Field(1.0, ge=1e-6, le=1e3, description="length-scale of the shared RFF basis; in "
                                   "[1e-6, 1e3] (points lie in [0, 1]^d: longer makes every feature constant, "
                                   "shorter overflows the frequencies)")
    rff_points: Count = Field(500, ge=1, description="history points nearest x_{r+1} the RFF weights are fitted on")
    refresh_candidates: Count = Field(200, ge=1, le=MAX_POINTS,
                                    description="uniform candidates around x_{r+1} refresh_top is chosen from")
    refresh_top: Count = Field(50, ge=0, description="refresh queries (at most refresh_candidates)")
    gamma: Gamma = Field("decay", description="correction weight: 'decay' = 1/(t+1) (code), or a finite constant "
                                              ">= 0 (paper theory; reviews: 1; negative would push against the "
                                              "correction)")

    @model_validator(mode="after")
    def _check_tops(self) -> FZooSSettings:
        for top, pool in (("explore_top", "explore_candidates"), ("refresh_top", "refresh_candidates")):
            if getattr(self, top) > getattr(self, pool):
                from fedsim.scenario import _PathError  # not at import: scenario imports this module

                raise _PathError(top, f"{getattr(self, top)} > {pool} ({getattr(self, pool)}): the top queries are "
                                      f"chosen among the {pool}")
        return self


class RGFSettings(_Strict):
    """The finite-difference baselines' estimator (spec §11.5): q orthonormal Gaussian directions, forward steps."""

    directions: Count = Field(20, ge=1, description="q orthonormal directions: at most d (checked with the task)")
    mu: Num = Field(0.01, gt=0, le=1, description="finite-difference step; at most 1 (points lie in [0, 1]^d)")


class MessageDefenses(_Strict):
    """Defenses on FZooS's surrogate message (spec §11.6 'fedsim experiments'), applied by each client."""

    y_noise: Num = Field(0.0, ge=0, le=1e3, description="std of Gaussian noise on the normalised values (in "
                                                           "[0, 1]) before the fit; at most 1e3 (beyond, the message "
                                                           "is noise and the surrogate overflows)")
    nu_noise: Num = Field(0.0, ge=0, le=1e3, description="std of Gaussian noise on each sent weight nu_i (|nu| is "
                                                            "O(1)-O(10)); at most 1e3 (beyond, the global surrogate "
                                                            "overflows: measured non-finite at 1e300)")
    ridge: Num = Field(0.0, ge=0, le=1e6, description="ridge lambda of the RFF fit (0: min-norm least squares); "
                                                         "at most 1e6 (beyond, the weights are all 0)")
    secagg: Flag = Field(False, description="pairwise-masked nu_i: the server learns only the weighted sum")


class ZOAttacks(_Strict):
    """The curious server's attacks on the messages (:mod:`fedsim.zo.attacks`), scored by the evaluator."""

    function_extraction: Flag = Field(True, description="R^2 of the rebuilt mu_i against f_i at held-out points")
    label_set: Flag = Field(True, description="metric task: which classes a client holds, from "
                                               "the surrogate slope grad mu_i (fzoos) or the local step "
                                               "x_i - x_r (every method)")
    every: Count = Field(1, ge=1, description="attack every k-th round's messages (and the last)")
    heldout_points: Count = Field(200, ge=2, le=MAX_POINTS,
                                description="random points the extraction R^2 is measured at (R^2 needs at least 2)")


class ZerothOrderSpec(_Strict):
    """``zeroth_order``: the task, the method and its settings."""

    task: ZOTask = ZOTask()
    method: Literal["fzoos", "fedzo", "fedprox", "scaffold1", "scaffold2"] = "fzoos"
    local_iters: Count = Field(10, ge=1, description="T: local Adam steps per round (authors' README: 5-20)")
    lr: Num = Field(0.01, gt=0, le=1, description="local Adam step size; at most 1 (an Adam step moves each "
                                                   "coordinate by about lr, points lie in [0, 1]^d)")
    global_lr: Num = Field(1.0, gt=0, le=10, description="eta: x_{r+1} = x_r - eta * sum_i w_i (x_r - x_i); at "
                                                           "most 10 (the result is clipped to [0, 1]^d)")
    safeguard: yaml_literal("off", "message") = Field(  # type: ignore[valid-type]
        "message", description="keep x_r if F(x_{r+1}) >= F(x_r), from values the clients send (an extra "
                               "message each round, counted as queries); 'off' always moves (bare off, which "
                               "YAML reads as false, means 'off' too)")
    prox_mu: Num = Field(1.0, ge=0, le=1e4, description="fedprox: weight of (x - x_r); at most 1e4 (beyond, "
                                                          "Adam's normalised step ignores the estimate)")
    fzoos: FZooSSettings = FZooSSettings()
    rgf: RGFSettings = RGFSettings()
    defenses: MessageDefenses = MessageDefenses()
    attacks: ZOAttacks = ZOAttacks()

    @model_validator(mode="after")
    def _check(self) -> ZerothOrderSpec:
        from fedsim.scenario import _PathError

        touched = self.defenses.model_fields_set
        if self.method != "fzoos" and touched & {"y_noise", "nu_noise", "ridge", "secagg"}:
            raise _PathError("defenses", f"protect FZooS's surrogate message; {self.method} sends none")
        return self
