"""Client-level central DP with Flower's strategy wrappers (McMahan et al., ICLR 2018; adaptive
clipping: Andrew et al., NeurIPS 2021).

Each sampled client's model update ``reply - current weights`` is clipped to L2 norm ``clipping_norm``
(C), the server takes the UNIFORM mean of the K clipped updates (K = clients sampled per round) and
adds N(0, (sigma C / K)^2) to it. Uniform, not weighted by num-examples: one client moves the uniform
mean by at most C / K, the sensitivity Flower's noise is calibrated to, as in McMahan et al. (2018,
fixed weights). A weighted mean would move by up to C * max_k(n_k / n), and the true noise multiplier
would be sigma / (K max_k n_k / n) (sigma 0.70 instead of 1 for 10 Dirichlet(0.5) digit clients):
the reported epsilon would understate the loss. The run's privacy block says ``aggregation: uniform``.
Adaptive clipping moves C towards the ``target_clipped_quantile`` of update norms with a noisy count
(Flower raises sigma for the update so that both releases compose to the ``noise_multiplier`` asked for).
Its noise uses the norm the round's updates were clipped to; Flower 1.42 noises with the norm it has just
updated, below that one when most updates were clipped (:class:`_RoundNormNoise`).
Wrappers: ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` from
``flwr.serverapp.strategy``; ``side: client`` adds Flower's ``fixedclipping_mod`` /
``adaptiveclipping_mod`` to the ClientApp. FedAvg only: the wrappers clip ``reply - current``, which is
no update under fedsgd (refused).

What the honest-but-curious server sees (the capture sits outside the wrapper, on the raw replies):

* ``side: server``: the RAW, unclipped update of every client. DP protects only the released model
  (whoever sees later global models), not the update against the server that runs the wrapper.
* ``side: client``: the CLIPPED update (norm <= C), still without noise: the server adds noise to the
  aggregate after it has seen every clipped update. Clipping bounds, but does not hide, one update.

Privacy accounting (client-level, RDP: Mironov, CSF 2017): one subsampled Gaussian step per round
with q = clients_per_round / clients and sigma = ``noise_multiplier``, as :func:`central_dp_epsilon`
computes (q = 1 under full participation: no amplification, exact). fedsim's client sampling is a
fixed-size draw, not the Poisson sampling this analysis assumes; the figure is the customary
approximation, and the run's privacy block says so (``sampling``). Adaptive clipping composes the count
and the update releases to the same sigma (Andrew et al., Thm. 1), so the same figure applies.
``target_epsilon`` (instead of ``noise_multiplier``) solves sigma for the planned rounds with Opacus's
``get_noise_multiplier`` on the same accountant (RDP, q as above, one step a round; tolerance 0.01 below
the target), as dp_sgd does for its steps, so a benchmark can run both at a matched epsilon. Epsilon
is written into the per-round history (``epsilon``, ``delta``, ``noise_multiplier``, ``sample_rate``)
through :meth:`CentralDP.server_round_metrics`; ``fedsim.privacy.summary`` re-accounts it with Google's
dp_accounting (RDP and PLD) for the report.

Flower draws its noise from NumPy's global generator; here each round's aggregation runs with that
generator seeded from (seed, "central_dp", round) and restored afterwards, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from pydantic import Field

from fedsim.defenses.base import Defense, DefenseParams, register_defense
from fedsim.defenses.dp_sgd import solve_noise_multiplier
from fedsim.errors import IncompatibleDefenseError, ScenarioError
from fedsim.privacy.accounting import opacus_epsilon
from fedsim.scenario import DefenseSpec, Scenario
from fedsim.seeding import derive_seed
from fedsim.simulation import keys
from fedsim.simulation.records import flower_arrays_cached

ADAPTIVE_ONLY = ("initial_clipping_norm", "target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev")


class CentralDPParams(DefenseParams):
    side: Literal["server", "client"] = Field("server", description="where updates are clipped")
    clipping: Literal["fixed", "adaptive"] = "fixed"
    noise_multiplier: float = Field(1.0, ge=0, description="sigma: noise std on the sum = sigma * C")
    target_epsilon: float | None = Field(None, gt=0, description="solve sigma so the planned rounds spend this "
                                         "(client-level, RDP); replaces noise_multiplier")
    clipping_norm: float = Field(1.0, gt=0, description="C for fixed clipping")
    initial_clipping_norm: float = Field(0.1, gt=0, description="adaptive: the first C")
    target_clipped_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: fraction of updates clipped")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive: geometric step of C")
    clipped_count_stddev: float | None = Field(None, ge=0, description="adaptive: noise on the count (K/20)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta at which epsilon is reported")


def central_dp_epsilon(scenario: Scenario) -> list[float]:
    """Client-level epsilon after each round 1..R of the scenario's ``central_dp`` defense (RDP)."""
    spec = next((d for d in scenario.defenses if d.name == "central_dp"), None)
    if spec is None:
        return []
    p = CentralDPParams.model_validate(spec.params)
    return [_epsilon_after(p, scenario, r) for r in range(1, scenario.federation.rounds + 1)]


def _sample_rate(scenario: Scenario) -> float:
    fed = scenario.federation
    return min(1.0, fed.sampled_per_round / fed.clients)


def noise_multiplier_of(p: CentralDPParams, scenario: Scenario) -> float:
    """Sigma of the run: ``noise_multiplier``, or the one that spends ``target_epsilon`` at ``delta`` over the
    scenario's rounds (one sampled Gaussian step per round at q = clients_per_round / clients, RDP)."""
    if p.target_epsilon is None:
        return p.noise_multiplier
    return solve_noise_multiplier(p.target_epsilon, p.delta, _sample_rate(scenario), scenario.federation.rounds,
                                  "rdp")


def _epsilon_after(p: CentralDPParams, scenario: Scenario, rounds: int) -> float:
    return opacus_epsilon([(noise_multiplier_of(p, scenario), _sample_rate(scenario), rounds)], p.delta, "rdp")


class _SeededNoise:
    """Mixin for Flower's DP wrappers: aggregate with NumPy's global generator seeded per round, and keep the
    clipping norm the round's updates are clipped to (:meth:`round_clipping_norm`)."""

    fedsim_seed: int = 0
    fedsim_round_norm: float | None = None

    def round_clipping_norm(self) -> float:
        """The clipping norm of the round being aggregated: the norm every update of the round was clipped to
        (adaptive clipping: the norm before this round's update of it), i.e. the round's sensitivity C (the
        uniform mean moves by at most C / K).

        The adaptive wrappers' noise uses it (:class:`_RoundNormNoise`). (The audit's client canaries send updates
        of 10 x the ``clipping_norm`` of the round, read when it is configured, and are clipped here like any
        client: :mod:`fedsim.audit.client_canaries`.)
        """
        if self.fedsim_round_norm is None:
            return float(self.clipping_norm)  # type: ignore[attr-defined]
        return self.fedsim_round_norm

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        self.fedsim_round_norm = float(self.clipping_norm)  # type: ignore[attr-defined]
        saved = np.random.get_state()
        np.random.seed(derive_seed(self.fedsim_seed, "central_dp", server_round) % 2**32)
        try:
            with flower_arrays_cached():  # Flower's wrapper converts every reply's arrays twice: headers cached
                return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        finally:
            np.random.set_state(saved)


class ServerSideFixed(_SeededNoise, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientSideFixed(_SeededNoise, DifferentialPrivacyClientSideFixedClipping):
    pass


class _RoundNormNoise(_SeededNoise):
    """Adaptive clipping noised with the norm the round's updates were clipped to.

    Andrew et al. (NeurIPS 2021, Alg. 1) clip round t's updates to C_t, add N(0, (sigma C_t / K)^2) to their mean,
    and only then move the norm to C_{t+1}. Flower 1.42's adaptive wrappers (``dp_adaptive_clipping.py``) update
    the norm first and draw the noise with C_{t+1}: when more than the target quantile was clipped, C_{t+1} < C_t
    (about 0.9 C_t at the defaults) and the noise is sigma C_{t+1} / K against a sensitivity of C_t / K, a noise
    multiplier below the one accounted. Here the noise uses C_t; the norm update is Flower's.
    """

    def _add_noise_to_aggregated_arrays(self, aggregated: Any) -> Any:
        updated = self.clipping_norm  # type: ignore[attr-defined]
        self.clipping_norm = self.round_clipping_norm()
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]
        finally:
            self.clipping_norm = updated


class ServerSideAdaptive(_RoundNormNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class ClientSideAdaptive(_RoundNormNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


def _beside_truth(mod: Callable, msg: Message, ctx: Context, call_next: Callable) -> Message:
    """Run a Flower clipping mod on the update alone: it insists on exactly one ArrayRecord, but a
    targeted client also attaches its ground truth (for the evaluator), which is set aside meanwhile."""
    kept: dict[str, Any] = {}

    def inner(m: Message, c: Context) -> Message:
        out = call_next(m, c)
        if not out.has_error() and keys.TRUTH in out.content.array_records:
            kept["truth"] = out.content.array_records[keys.TRUTH]
            del out.content[keys.TRUTH]
        return out

    with flower_arrays_cached():  # the mod converts the update and the model: headers parsed once
        out = mod(msg, ctx, inner)
    if "truth" in kept and not out.has_error():
        out.content[keys.TRUTH] = kept["truth"]
    return out


def fixed_clipping_mod(msg: Message, ctx: Context, call_next: Callable) -> Message:
    """Flower's ``fixedclipping_mod``, ground-truth aware."""
    return _beside_truth(fixedclipping_mod, msg, ctx, call_next)


def adaptive_clipping_mod(msg: Message, ctx: Context, call_next: Callable) -> Message:
    """Flower's ``adaptiveclipping_mod``, ground-truth aware."""
    return _beside_truth(adaptiveclipping_mod, msg, ctx, call_next)


@register_defense("central_dp")
class CentralDP(Defense):
    Params = CentralDPParams
    stage = 70
    summary = "client-level central DP (Flower wrappers): clip each update, noise the aggregate"

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        p = cls.Params.model_validate(spec.params)
        if scenario.federation.protocol != "fedavg":
            raise IncompatibleDefenseError("central_dp clips 'reply - current weights', so it needs "
                                           "federation.protocol: fedavg (fedsgd replies are gradients)")
        if sum(d.name == spec.name for d in scenario.defenses) > 1:
            raise IncompatibleDefenseError("central_dp can appear once")
        if p.target_epsilon is not None and "noise_multiplier" in spec.params:
            raise IncompatibleDefenseError("central_dp takes params.noise_multiplier or params.target_epsilon, "
                                           "not both")
        wrong = [k for k in (ADAPTIVE_ONLY if p.clipping == "fixed" else ("clipping_norm",)) if k in spec.params]
        if wrong:
            raise ScenarioError(f"params.{wrong[0]}", f"does not apply to clipping: {p.clipping}")
        sigma = noise_multiplier_of(p, scenario)
        if p.clipping == "adaptive" and sigma > 0:
            stddev = p.clipped_count_stddev
            if stddev is None:
                stddev = scenario.federation.sampled_per_round / 20
            if sigma >= 2 * stddev:
                raise IncompatibleDefenseError(
                    f"adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev ({2 * stddev:g}; "
                    "the default stddev is clients_per_round / 20): raise params.clipped_count_stddev")

    def wrap_strategy(self, strategy: Any) -> Any:
        if self.scenario is None:
            raise IncompatibleDefenseError("central_dp needs the scenario (build it with build_defenses)")
        p, k = self.params, self.scenario.federation.sampled_per_round
        sigma = noise_multiplier_of(p, self.scenario)
        if not hasattr(strategy, "uniform_weights"):
            raise IncompatibleDefenseError("central_dp needs fedsim's FedAvg strategy (it averages uniformly)")
        strategy.uniform_weights = True  # the mean the noise sigma*C/K is calibrated to (see module doc)
        if p.clipping == "fixed":
            cls = ServerSideFixed if p.side == "server" else ClientSideFixed
            wrapped = cls(strategy, sigma, p.clipping_norm, k)
        else:
            cls = ServerSideAdaptive if p.side == "server" else ClientSideAdaptive
            wrapped = cls(strategy, sigma, k, initial_clipping_norm=p.initial_clipping_norm,
                          target_clipped_quantile=p.target_clipped_quantile, clip_norm_lr=p.clip_norm_lr,
                          clipped_count_stddev=p.clipped_count_stddev)
        wrapped.fedsim_seed = self.scenario.seed
        return wrapped

    def client_mods(self) -> list[Any]:
        if self.params.side == "server":
            return []
        return [fixed_clipping_mod if self.params.clipping == "fixed" else adaptive_clipping_mod]

    def server_round_metrics(self, server_round: int) -> dict[str, float]:
        """Metrics for the server's per-round history row (epsilon spent after ``server_round``)."""
        if self.scenario is None or server_round < 1:
            return {}
        return {"epsilon": _epsilon_after(self.params, self.scenario, server_round), "delta": self.params.delta,
                "noise_multiplier": noise_multiplier_of(self.params, self.scenario),
                "sample_rate": _sample_rate(self.scenario)}
