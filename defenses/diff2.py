"""DIFF2-GD: DP full-gradient descent through clipped gradient DIFFERENCES with periodic restarts
(Murata & Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences for Nonconvex Distributed
Learning", ICML 2023; spec algorithms-more.md §9). Turns ``federation.protocol: fedsgd`` into DIFF2-GD.

Rounds are the paper's r = 0..R-1 (fedsim's server round r + 1); every client takes part in every round:

* **clients** (:mod:`fedsim.defenses.diff2_client`): restart rounds (r mod T == 0) send
  ``a_p = (1/n_p) sum_i clip_C1(grad l(x_r; z_i))`` over the WHOLE partition; difference rounds send
  ``b_p = (1/n_p) sum_i clip_{C2 dx_r}(grad l(x_r; z_i) - grad l(x_{r-1}; z_i))``, dx_r = ||x_r - x_{r-1}||;
* **server** (:meth:`Diff2.server_update`, on both server paths): ``v_r = mean_p a_p`` (restart) or
  ``v_r = v_{r-1} + mean_p b_p`` (difference), plus the noise below, then ``x_{r+1} = x_r - eta v_r``
  (eta = ``federation.server_lr``, else ``local.lr``). T = 1 is DP-GD.

**Noise** with std ``s_r = C1 sigma1`` (restart) or ``C2 dx_r sigma2`` (difference) per coordinate ON THE MEAN,
placed by ``noise_placement`` (each a different threat model; all three release the same-noised v_r):

* ``central`` (the authors' code): the server adds N(0, s_r^2) to the mean, from a generator seeded by
  (seed, "diff2", round), one ``randn`` per parameter in the message's key order. The curious server sees every
  client's UN-noised message (under ``secagg``: the un-noised aggregate): the guarantee holds for what the server
  releases, not against the server.
* ``local``: each client adds N(0, P s_r^2) to its own message (so the uniform mean carries N(0, s_r^2)); the
  server sees noised messages; against it each client has the weaker ``z = sqrt(P) sigma n_p / 2``.
* ``distributed`` (needs ``secagg``): each client adds a share N(0, (s_r N / (n_p sqrt(P)))^2), N = sum n_p, so
  that SecAgg+'s num-examples-weighted mean ``sum_p (n_p / N)(m_p + xi_p)`` carries exactly N(0, s_r^2); with
  equal partitions that is N(0, P s_r^2), the same share as ``local``. (Spec §9.6 writes the share as
  (C sigma)^2 / P: that gives the SUM of P shares variance (C sigma)^2, i.e. (C sigma)^2 / P^2 on the mean the
  server releases, P^2 times too little for the accounted sigma.) The server sees only the aggregate.

Client shares come from a generator seeded by (seed, "diff2", round, partition id) and are recorded as ground truth.

**Aggregation.** The plain path takes the UNIFORM mean over the P clients (the authors' code): one record of
client p moves it by at most ``2 C / (n_p P) <= 2 C / (n_min P)``, the sensitivity the noise is calibrated to.
SecAgg+ always weights by num-examples (n_p, the whole partition): ``sum_p (n_p / N) m_p`` moves by at most
``2 C / N <= 2 C / (n_min P)`` (N >= n_min P), so the same noise gives at least the accounted guarantee. The two
means coincide for equal partitions; the server rule is one function on both paths.

**Privacy** (:mod:`fedsim.privacy.diff2`): ``target_epsilon`` solves sigma1, sigma2 with the authors' closed form
(ceil(R/T) restarts; ``calibration: rdp`` then scales both down until the RDP epsilon, DP-SGD's accountant, meets
the target instead of the looser bound); explicit ``sigma1``/``sigma2`` are used as given. Each round reports
in the server's history (``diff2_*``): the RDP epsilon so far, the closed-form bound, the noise multipliers
z = sigma n_min P / 2 and the counts; ``fedsim.privacy.summary`` re-accounts the run with dp_accounting (RDP,
PLD) and the exact Gaussian composition, and states epsilon against the curious server for the placement.

**Audit** (``audit:`` example canaries, :mod:`fedsim.audit`): DIFF2's neighbours replace one record, so every canary
of client p is one of its records, with the constant gradient ``+10 C1 c_j`` (included) or ``-10 C1 c_j`` (left
out): restart rounds append these to the real records' per-example gradients BEFORE the clip to C1, so DIFF2's own
clipping brings each to C1 and ``a_p`` gains ``sum_j s_j C1 c_j / n_p`` before any noise (the local and distributed
shares come after it, the central noise on the server); difference rounds add nothing (a constant gradient has zero
differences, so the clip to C2 dx is not exercised). With ``c1`` null (no clipping, zero noise only) the canaries
have norm 1.0 (:meth:`Diff2ClientRound.canary_rows`).

Validation (exit 2, with the YAML path): fedsgd only; full participation; ``distributed`` needs ``secagg``;
exactly one of ``target_epsilon`` and explicit sigmas; ``c1``/``c2`` null (no clipping) only with zero noise; no
other defense that changes training or the server strategy; no update transform before the noise that can move
two neighbouring messages apart (pruning, quantization: :func:`fedsim.defenses.base.check_transforms_before_noise`;
clipping and data-independent noise may stay); a model whose per-example gradients ``torch.func``
can take (no BatchNorm in training mode, no dropout). A client that fails stops the run (the estimator and the
noise need every client's message every round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.audit.inject import canaries_at
from fedsim.defenses.base import (
    DEFENSES,
    Defense,
    DefenseParams,
    UpdateContext,
    check_transforms_before_noise,
    register_defense,
)
from fedsim.defenses.diff2_client import Diff2ClientRound, is_restart, step_norm
from fedsim.errors import IncompatibleDefenseError, ScenarioError, SimulationError
from fedsim.privacy import diff2 as acct
from fedsim.scenario import DefenseSpec, Scenario
from fedsim.seeding import torch_generator
from fedsim.training import TrainingJob

PLACEMENTS = ("central", "distributed", "local")  # the history rows carry the index (rows hold numbers only)


class Diff2Params(DefenseParams):
    restart_period: int = Field(..., ge=1, description="T: a restart round every T rounds (1: DP-GD)")
    c1: float | None = Field(1.0, gt=0, description="C1, per-example clip of restart gradients (null: none)")
    c2: float | None = Field(1.0, gt=0, description="C2: difference clip radius C2 * ||x_r - x_(r-1)|| (null: none)")
    target_epsilon: float | None = Field(None, gt=0, description="solve sigma1, sigma2 (authors' closed form)")
    sigma1: float | None = Field(None, ge=0, description="restart noise std / C1, on the mean")
    sigma2: float | None = Field(None, ge=0, description="difference noise std / (C2 dx), on the mean")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP")
    noise_placement: Literal["central", "distributed", "local"] = "central"
    calibration: Literal["closed_form", "rdp"] = Field(
        "closed_form", description="target_epsilon met by the authors' closed-form bound, or by the RDP accountant")
    chunk_size: int = Field(200, ge=1, description="examples per vmapped per-sample gradient chunk")


@dataclass(frozen=True)
class Diff2Plan:
    """The run's noise scales and the facts they depend on (partition sizes are public under DIFF2)."""

    sigma1: float
    sigma2: float
    alpha: float  # the RDP order of the closed-form bound
    sizes: tuple[int, ...]  # n_p per partition id
    rounds: int
    restart_period: int

    @property
    def n_min(self) -> int:
        return min(self.sizes)

    @property
    def clients(self) -> int:
        return len(self.sizes)

    @property
    def z1(self) -> float:
        return acct.noise_multiplier(self.sigma1, self.n_min, self.clients)

    @property
    def z2(self) -> float:
        return acct.noise_multiplier(self.sigma2, self.n_min, self.clients)


def _counts(rounds: int, restart_period: int) -> tuple[int, int]:
    restarts = acct.restarts(rounds, restart_period)
    return restarts, rounds - restarts


def best_alpha(z1: float, z2: float, restarts: int, differences: int, delta: float) -> float:
    """The order minimizing the closed-form bound ``A alpha + L / (alpha - 1)``: ``1 + sqrt(L / A)``."""
    a = sum(c / (2 * z * z) for z, c in ((z1, restarts), (z2, differences)) if c > 0 and z > 0)
    return 1 + math.sqrt(math.log(1 / delta) / a) if a > 0 else math.inf


@register_defense("diff2")
class Diff2(Defense):
    Params = Diff2Params
    audits_examples = True  # audit: example canaries (fedsim.audit)
    stage = 60  # after the update transforms (clipping, pruning: 50): the client's noise share is added last
    summary = "DIFF2-GD: DP gradient estimator from clipped per-sample gradient differences, periodic restarts"
    uniform_mean = True
    sensitivity_preserving = True  # its transform only adds the client's noise share, drawn independently of the data
    every_client_reason = ("defense 'diff2' needs every client's message every round (its estimator "
                           "v_r = v_(r-1) + mean and its noise calibration assume all P clients)")
    full_partition_messages = True

    def __init__(self, params: Diff2Params, name: str, scenario: Scenario | None = None) -> None:
        super().__init__(params, name, scenario)
        # (round, partition) -> that client round's clip radius, from its message (before_read_gradients) to its
        # noise share (transform_update): both run in the same process, inside one run_client_round
        self._clip: dict[tuple[int, int], float | None] = {}

    # -- validation ----------------------------------------------------------------------------------
    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        p = cls.Params.model_validate(spec.params)
        fed = scenario.federation
        if fed.protocol != "fedsgd":
            raise ScenarioError("federation.protocol", f"diff2 runs as fedsgd (one full-gradient message a round), "
                                                       f"got {fed.protocol}")
        if fed.sampled_per_round != fed.clients:
            raise ScenarioError("federation.clients_per_round", "diff2 needs every client every round: remove it")
        if sum(d.name == spec.name for d in scenario.defenses) > 1:
            raise IncompatibleDefenseError("diff2 can appear once")
        explicit = p.sigma1 is not None or p.sigma2 is not None
        if p.calibration != "closed_form" and p.target_epsilon is None:
            raise ScenarioError("params.calibration", "applies to target_epsilon only (sigmas are used as given)")
        if (p.target_epsilon is None) == (not explicit):
            raise ScenarioError("params.target_epsilon", "give exactly one of target_epsilon and sigma1 (+ sigma2)")
        if explicit and p.sigma1 is None:
            raise ScenarioError("params.sigma1", "sigma2 was given without sigma1")
        if explicit and p.restart_period > 1 and p.sigma2 is None:
            raise ScenarioError("params.sigma2", f"restart_period {p.restart_period} has difference rounds: "
                                                 "give sigma2 too")
        for clip, sigma, key in ((p.c1, p.sigma1, "c1"), (p.c2, p.sigma2, "c2")):
            if clip is None and key == "c2" and p.restart_period == 1:
                continue  # DP-GD has no difference round
            if clip is None and (p.target_epsilon is not None or (sigma or 0) > 0):
                raise ScenarioError(f"params.{key}", "null (no clipping) leaves the sensitivity unbounded: "
                                                     "it needs zero noise (sigma 0), not a privacy target")
        secure = any(getattr(DEFENSES.get(d.name), "secure_aggregation", False)
                     for d in scenario.defenses if d.name in DEFENSES)
        if p.noise_placement == "distributed" and not secure:
            raise ScenarioError("params.noise_placement", "distributed noise shares are private only inside a "
                                                          "secure aggregate: add the secagg defense (or use "
                                                          "central or local)")
        noise_stage = math.inf if p.noise_placement == "central" else cls.stage  # central: the server adds it
        check_transforms_before_noise(scenario, spec, noise_stage, "the per-example clip (one record moves the mean "
                                                                   "by at most 2 C / (n_min P))")
        for other in scenario.defenses:
            if other.name == spec.name or other.name not in DEFENSES:
                continue
            kind = DEFENSES.get(other.name)
            hooks = [h for h in ("wrap_training", "wrap_strategy", "client_mods", "server_update")
                     if getattr(kind, h) is not getattr(Defense, h)]
            if hooks and not getattr(kind, "secure_aggregation", False):
                raise IncompatibleDefenseError(f"diff2 computes each client's message and the server step itself: "
                                               f"it cannot be combined with {other.name} (which uses {hooks[0]})")

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Refuse a model whose per-example gradients ``vmap(grad)`` cannot take in training mode (BatchNorm
        mixes the examples, dropout draws randomness): probed on a copy with two zero examples."""
        import copy

        from fedsim.models.base import zero_inputs

        probe = copy.deepcopy(model).train()
        params = {k: v.detach() for k, v in probe.named_parameters()}
        buffers = {k: v.detach() for k, v in probe.named_buffers()}

        def out_sum(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(probe, {**p, **buffers}, (x.unsqueeze(0),)).sum()

        try:
            with torch.random.fork_rng(devices=[]):
                torch.func.vmap(torch.func.grad(out_sum), in_dims=(None, 0))(params, zero_inputs(probe, input_shape))
        except (RuntimeError, ValueError, NotImplementedError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            changers = [f"defenses[{i}] ({d.name})" for i, d in enumerate(self.scenario.defenses if self.scenario
                                                                         else [])
                        if d.name != self.name and d.name in DEFENSES
                        and DEFENSES.get(d.name).transform_model is not Defense.transform_model]
            fix = (f"remove {', '.join(changers)}, which change(s) the model (e.g. adds dropout), and keep a model "
                   "without dropout and BatchNorm (model.norm: none or group, model.dropout: 0)" if changers else
                   "use a model without dropout and BatchNorm (model.norm: none or group, model.dropout: 0)")
            raise IncompatibleDefenseError(
                f"diff2 needs per-example gradients (torch.func vmap) of the model in training mode, which fail "
                f"({type(err).__name__}: {first}): {fix}") from None

    # -- the plan --------------------------------------------------------------------------------------
    @cached_property
    def plan(self) -> Diff2Plan:
        """sigma1, sigma2 and the partition sizes of this run (built on first use, on client or server)."""
        if self.scenario is None:
            raise IncompatibleDefenseError("diff2 needs the scenario (build it with build_defenses)")
        from fedsim.simulation.setup import setup_for

        p, fed = self.params, self.scenario.federation
        sizes = tuple(len(part) for part in setup_for(self.scenario).partitions)
        if min(sizes) < 1:
            raise SimulationError(f"diff2: client {sizes.index(min(sizes))} has no examples")
        if p.target_epsilon is not None:
            cal = acct.closed_form_sigmas(p.target_epsilon, p.delta, fed.rounds, p.restart_period, min(sizes),
                                          len(sizes))
            if p.calibration == "rdp":
                cal = acct.rdp_calibrated(cal, p.target_epsilon, p.delta, fed.rounds, p.restart_period, min(sizes),
                                          len(sizes))
            return Diff2Plan(cal.sigma1, cal.sigma2, cal.alpha, sizes, fed.rounds, p.restart_period)
        s1, s2 = float(p.sigma1 or 0.0), float(p.sigma2 or 0.0)
        z1, z2 = (acct.noise_multiplier(s, min(sizes), len(sizes)) for s in (s1, s2))
        alpha = best_alpha(z1, z2, *_counts(fed.rounds, p.restart_period), p.delta)
        return Diff2Plan(s1, s2, alpha, sizes, fed.rounds, p.restart_period)

    def noise_std(self, server_round: int, clip: float | None) -> float:
        """s_r: the noise std per coordinate on the mean in ``server_round`` for clip radius ``clip``."""
        sigma = self.plan.sigma1 if is_restart(server_round, self.params.restart_period) else self.plan.sigma2
        return 0.0 if clip is None or sigma == 0 else clip * sigma

    # -- client hooks -------------------------------------------------------------------------------------
    def wrap_training(self, job: TrainingJob) -> TrainingJob:
        p = self.params
        key = (job.round, job.partition_id)

        def on_round(clip: float | None, dx: float) -> None:
            if p.noise_placement != "central":  # transform_update scales this client's noise share by it
                self._clip[key] = clip

        run = Diff2ClientRound(job, c1=p.c1, c2=p.c2, restart_period=p.restart_period, chunk_size=p.chunk_size,
                               state_prefix=self.name, on_round=on_round,
                               canaries=canaries_at(self.scenario, "example"))
        job.sample_batches = run.sample_batches
        job.loss_fn = run.loss_fn
        job.before_read_gradients = run.before_read_gradients
        return job

    def transform_update(self, update: dict[str, Tensor], ctx: UpdateContext
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """local / distributed: add the client's noise share (module doc); central: send as computed."""
        placement = self.params.noise_placement
        if placement == "central":
            return update, {}
        key = (ctx.round, ctx.partition_id)
        if key not in self._clip:
            raise RuntimeError(f"diff2: no message was computed for round {ctx.round}, client {ctx.partition_id}")
        std = self.noise_std(ctx.round, self._clip.pop(key))
        plan = self.plan
        if placement == "local":
            share = math.sqrt(plan.clients) * std
        else:
            share = std * sum(plan.sizes) / (plan.sizes[ctx.partition_id] * math.sqrt(plan.clients))
        if share == 0:
            return update, {}
        gen = torch_generator(ctx.seed, "diff2", ctx.round, ctx.partition_id)
        noisy, noise = {}, {}
        for k, v in update.items():
            eps = (torch.randn(v.shape, generator=gen, dtype=torch.float32) * share).to(v.device, v.dtype)
            noisy[k], noise[f"noise/{k}"] = v + eps, eps
        return noisy, noise

    # -- server hooks -------------------------------------------------------------------------------------
    def server_update(self, server_round: int, current: dict[str, Tensor], mean_message: dict[str, Tensor],
                      memory: dict[str, Any]) -> dict[str, Tensor]:
        """v_r and x_{r+1} (module doc). ``memory``: ``v`` (v_{r-1}), ``model`` (x_{r-1}), ``round``."""
        if self.scenario is None:
            raise IncompatibleDefenseError("diff2 needs the scenario (build it with build_defenses)")
        p, fed = self.params, self.scenario.federation
        names = list(mean_message)
        restart = is_restart(server_round, p.restart_period)
        if not restart and memory.get("round") != server_round - 1:
            raise SimulationError(f"diff2: the server has no estimator from round {server_round - 1} "
                                  f"for difference round {server_round}")
        v = {k: (m.clone() if restart else memory["v"][k] + m) for k, m in mean_message.items()}
        if p.noise_placement == "central":
            if restart:
                clip = p.c1
            else:
                clip = None if p.c2 is None else p.c2 * step_norm(current, memory["model"], names)
            std = self.noise_std(server_round, clip)
            if std > 0:
                gen = torch_generator(self.scenario.seed, "diff2", server_round)
                for k in names:
                    v[k] = v[k] + (torch.randn(v[k].shape, generator=gen, dtype=torch.float32) * std).to(v[k].dtype)
        memory.update(v=v, round=server_round,
                      model={k: current[k].detach().clone() for k in names} if p.restart_period > 1 else {})
        lr = fed.server_lr or fed.local.lr
        return {k: (x - lr * v[k].to(x.dtype)) if k in v else x for k, x in current.items()}

    def message_reference(self, server_round: int) -> bool:
        return not is_restart(server_round, self.params.restart_period)

    def server_round_metrics(self, server_round: int) -> dict[str, float]:
        """The privacy spent after ``server_round`` (every figure is independent of the data: z1, z2 are fixed)."""
        if self.scenario is None or server_round < 1:
            return {}
        plan, p = self.plan, self.params
        restarts, differences = _counts(server_round, p.restart_period)
        extra = {"diff2_target_epsilon": p.target_epsilon} if p.target_epsilon is not None else {}
        if math.isfinite(plan.alpha):  # no noise: no order bounds anything
            extra["diff2_alpha"] = plan.alpha
        return {**extra,
            "diff2_epsilon": acct.rdp_epsilon(plan.z1, plan.z2, restarts, differences, p.delta),
            "diff2_epsilon_closed_form": acct.closed_form_epsilon(plan.z1, plan.z2, restarts, differences, p.delta,
                                                                  plan.alpha),
            "diff2_delta": p.delta, "diff2_sigma1": plan.sigma1,
            "diff2_sigma2": plan.sigma2, "diff2_z1": plan.z1, "diff2_z2": plan.z2, "diff2_restarts": restarts,
            "diff2_differences": differences, "diff2_restart_period": p.restart_period,
            "diff2_n_min": plan.n_min, "diff2_clients": plan.clients,
            "diff2_noise_placement": PLACEMENTS.index(p.noise_placement),
            "diff2_secure_aggregation": float(self._secure),  # what the server sees: each message, or the aggregate
        }

    @cached_property
    def _secure(self) -> bool:
        """Whether the scenario aggregates under SecAgg+ (the server then sees only the aggregate)."""
        return self.scenario is not None and any(
            getattr(DEFENSES.get(d.name), "secure_aggregation", False)
            for d in self.scenario.defenses if d.name in DEFENSES)
