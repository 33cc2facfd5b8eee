"""Sample-level DP-SGD inside each client's local training, with Opacus 1.6.

DP-SGD (Abadi et al., CCS 2016) clips every example's gradient to norm ``max_grad_norm`` (C), sums,
adds N(0, sigma^2 C^2) per coordinate and divides by the expected batch size. Privacy is accounted
per client with Opacus's accountants: RDP (Mironov, CSF 2017) by default, PRV or GDP on request.
One fresh Opacus wrapping per client per round:

* ``transform_model`` swaps BatchNorm for GroupNorm (``ModuleValidator.fix``; one group for vector
  features) on client, server and attacker models alike, with one warning on the ``fedsim`` logger.
* Per-sample gradients (``grad_sample_mode``; :mod:`fedsim.defenses.dp_modes`): Opacus hooks attached with
  ``wrap_model=False`` (``hooks``, ``functorch``, ``ghost``) or ExpandedWeights (``ew``) behind a module sharing the
  model's parameters, so the reply keeps the global model's ``state_dict`` keys; ``ghost`` is ghost clipping (Li,
  Tramer, Liang, Hashimoto, ICLR 2022), ``bk`` book-keeping clipping (Bu et al. ICML 2023, one backward pass;
  :mod:`fedsim.defenses.bk_clipping`): both need a loss accepting ``reduction=``, as cross-entropy does. ``auto`` (the
  default) picks from the model's structure, deterministically; every mode releases the same mechanism.
* Poisson batches (each example with probability q = batch_size / n per step, as the accountants
  assume) drawn from the job's batch generator; ``local.steps`` or ``epochs * ceil(n / batch_size)``
  steps a round, one for fedsgd. An empty batch is still a step: its update is pure noise, and the
  accountant counts it (a round where every sampled client drew nothing is a legal, noise-only round).
  With ``poisson: false`` batches have a fixed size and epsilon is the usual approximation.
* What the server learns besides the update: ``num-examples`` (FedAvg's weight) is the EXPECTED count
  ``round(n (1 - (1 - q)^steps))`` (:func:`declared_examples`; fedsgd: the batch size), never the
  realised Poisson draw, which no accountant covers. Attacks read it as their batch size: an estimate,
  as it must be; the evaluator still scores against the real batch.
* fedsgd sends the clipped, noised gradient (``pre_step`` before it is read); fedavg sends the weights
  after the DP steps. Noise comes from a generator seeded by (seed, "dp_sgd", round, partition id):
  the same scenario and seed give the same numbers on any backend.
* Epsilon accumulates over rounds: the accountant history ``[(sigma, q, steps)]`` is kept as JSON in
  the client's state (Flower ``Context.state``); each round reports ``epsilon``, ``delta``,
  ``noise_multiplier``, ``sample_rate`` and ``steps`` (in ``client_metrics``): a client that skips a
  round composes nothing for it. ``fedsim.privacy.summary`` rebuilds each client's history from these
  and re-accounts it with Google's dp_accounting (RDP and PLD) for the report. ``target_epsilon`` solves
  sigma with Opacus's ``get_noise_multiplier`` over the planned steps: steps a round x the rounds a client
  is expected to train (all of them under full participation, else ``ceil(rounds * clients_per_round /
  clients)``); a client sampled more often than expected ends above the target, as its epsilon shows.

The curious server sees only the clipped, noised update: the capture records what the client sent.

Under an ``audit:`` at the example level the client's included canaries join its batches with the accounted rate q
(drawn from the seed, not by the sampler; empty batches are steps too) as records whose constant per-example
gradient has norm 10 C: ``hooks``, ``functorch`` and ``ew`` append it to ``p.grad_sample`` before Opacus clips, so
the optimizer's own clipping must bring it to C; ghost and bk clipping have no per-example gradients, so there
``C c_j`` is added to the clipped sum before the noise and the clipping is not audited
(:func:`fedsim.audit.inject.attach_example_canaries`; ``auto`` takes ``hooks`` under such an audit).

DP-SAT and DP-SAM (:mod:`fedsim.defenses.dp_sat`, :mod:`fedsim.defenses.dp_sam`) are this defense with another
round class: ``_PrivateRound``'s extension points (``before_forward``, ``after_privatize``,
``account_query``, ``on_round_end``) carry their perturbation and second query; sampling, accounting,
the declared count and the per-sample modes stay here. At most one of the three per scenario.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.audit.inject import attach_example_canaries
from fedsim.defenses.base import DEFENSES, Defense, DefenseParams, register_defense
from fedsim.defenses.dp_modes import (
    PER_EXAMPLE_GRADIENT_MODES,
    dp_optimizer,
    mode_loss,
    prepare_hooks,
    resolve_mode,
)
from fedsim.defenses.per_sample import per_sample_problem
from fedsim.errors import IncompatibleDefenseError
from fedsim.privacy.accounting import import_opacus, opacus_epsilon
from fedsim.run_caches import per_run_cache
from fedsim.scenario import DefenseSpec, FederationSpec, LocalTraining, Scenario
from fedsim.seeding import torch_generator
from fedsim.training import TrainingJob, batch_schedule

log = logging.getLogger("fedsim")

_BN_NOTICE_SHOWN = False


def poisson_batches(n: int, q: float, steps: int, gen: torch.Generator) -> list[Tensor]:
    """``steps`` Poisson batches: example i is in a batch with probability q, independently (may be empty)."""
    return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten() for _ in range(steps)]


def steps_per_round(n: int, local: LocalTraining, protocol: str) -> int:
    """DP steps a client takes in one round: one for fedsgd, else ``steps`` or epochs x ceil(n / bs)."""
    if protocol == "fedsgd":
        return 1
    return local.steps or local.epochs * math.ceil(n / min(local.batch_size, n))


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str, poisson: bool = True) -> float:
    """Epsilon an Opacus accountant (``rdp``, ``prv``, ``gdp``) gives for a history of (sigma, q, steps)."""
    return opacus_epsilon(history, delta, accountant, poisson)


def declared_examples(n: int, q: float, steps: int) -> int:
    """What a DP-SGD client declares as ``num-examples``: the EXPECTED number of distinct examples its
    round touches, ``round(n (1 - (1 - q)^steps))`` (at least 1), for Poisson batches of rate q.

    fedsgd (one step): q n = the batch size. The realised count would reveal the Poisson draws, which no
    accountant covers; this one depends only on n, q and steps, which the accountant already treats as
    public (q = batch_size / n). It is also FedAvg's weight, and what attacks read as the batch size.
    """
    return max(1, round(n * (1 - (1 - q) ** steps)))


@per_run_cache  # shared by one run's clients; emptied per bench cell, so every cell pays the solve
def solve_noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Sigma giving ``target_epsilon`` after ``steps`` steps at sampling rate q (Opacus bisection, tol 0.01)."""
    import_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.01))


def expected_rounds(fed: FederationSpec) -> int:
    """Rounds a client is expected to train: all of them, or ceil(rounds * clients_per_round / clients)."""
    return math.ceil(fed.rounds * fed.sampled_per_round / fed.clients)


class DPSGDParams(DefenseParams):
    noise_multiplier: float | None = Field(None, ge=0, description="sigma (noise std = sigma * max_grad_norm)")
    target_epsilon: float | None = Field(None, gt=0, description="solve sigma so the planned rounds spend this")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example clipping norm C")
    accountant: Literal["prv", "rdp", "gdp"] = "rdp"
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost", "bk"] = Field(
        "auto", description="per-example gradient machinery (fedsim.defenses.dp_modes); auto: a cost model picks")
    poisson: bool = Field(True, description="Poisson sampling (what the accountants assume)")


class _SameKeys(nn.Module):
    """A module with ``inner``'s parameters, buffers and submodules (so the same ``state_dict`` keys),
    whose forward is ``forward``: lets ExpandedWeights and the empty-batch path sit in front of the
    model without renaming its keys to ``_module.*``."""

    def __init__(self, inner: nn.Module, forward: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self._parameters = inner._parameters
        self._buffers = inner._buffers
        self._non_persistent_buffers_set = inner._non_persistent_buffers_set
        self._modules = inner._modules
        self.training = inner.training
        self._dp_forward = forward

    def forward(self, x: Tensor) -> Tensor:
        return self._dp_forward(x)


class _PrivateRound:
    """One client's DP-SGD round: the TrainingJob hooks, sharing the plan (q, steps, sigma) they compute."""

    def __init__(self, defense: DPSGD, job: TrainingJob) -> None:
        import_opacus()
        p = defense.params
        self.defense, self.p, self.job = defense, p, job
        self.model = job.model
        self.q = self.sigma = 0.0
        self.bs = self.steps = 0
        self.sampler = job.sample_batches or batch_schedule
        self.base_optimizer = job.make_optimizer
        self.base_loss = job.loss_fn
        self.mode = defense.mode_for(self.model, job.loss_fn)  # auto resolved: the same in every process
        self.hooks = prepare_hooks(self.model, self.mode, p.max_grad_norm)
        self.dp_loss: Any = None
        self.empty = False  # the current batch is empty: the noise-only step (_noise_only_forward)

    # -- TrainingJob hooks --------------------------------------------------------------------------
    def sample_batches(self, n: int, local: LocalTraining, protocol: str, gen: torch.Generator) -> list[Tensor]:
        self.bs, self.steps = min(local.batch_size, n), steps_per_round(n, local, protocol)
        self.q = self.bs / n
        self.sigma = self.defense.noise_multiplier_for(self.job, self.q, self.steps)
        if not self.p.poisson:
            return self.sampler(n, local, protocol, gen)
        return poisson_batches(n, self.q, self.steps, gen)

    def declare_num_examples(self, n: int, batches: list[Tensor]) -> int | None:
        """``num-examples`` the client sends: under Poisson sampling the expected count
        (:func:`declared_examples`), never the realised one; fixed-size batches reveal nothing random."""
        if not self.p.poisson:
            return None  # the job's own count: fixed by n, the batch size and the steps, nothing random
        return declared_examples(n, self.q, self.steps)

    def make_optimizer(self, model: nn.Module, local: LocalTraining) -> torch.optim.Optimizer:
        from opacus.accountants import create_accountant

        mode = self.mode
        base = self.base_optimizer(model, local)
        device = next(self.model.parameters()).device
        opt = dp_optimizer(mode, base, noise_multiplier=self.sigma, max_grad_norm=self.p.max_grad_norm,
                           expected_batch_size=self.bs, loss_reduction="mean",
                           generator=torch_generator(self.job.seed, "dp_sgd", self.job.round, self.job.partition_id,
                                                     device=device))
        self.accountant = create_accountant(mechanism=self.p.accountant)  # GDP warns once: it is experimental
        self.accountant.history = [tuple(h) for h in json.loads(self.job.state.get(self.state_key, "[]"))]
        self.steps_before = sum(int(h[2]) for h in self.accountant.history)
        self.account = self.accountant.get_optimizer_hook_fn(sample_rate=self.q)

        def on_privatized(optimizer: Any) -> None:  # end of every pre_step: one Gaussian query released
            self.account_query(optimizer)
            self.after_privatize(optimizer)

        opt.attach_step_hook(on_privatized)
        # audit: included example canaries join the per-example gradients before the clipping (ghost: the
        # clipped sum before the noise; fedsim.audit.inject)
        attach_example_canaries(opt, self.defense.scenario, self.model, self.job.partition_id, self.job.round,
                                self.q, self.p.max_grad_norm, self.defense.queries_per_step,
                                mode in PER_EXAMPLE_GRADIENT_MODES)
        self.dp_loss = mode_loss(mode, self.hooks, opt, self.base_loss)  # ghost, bk: their own loss; else None
        return opt

    def loss_fn(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.empty:  # the noise-only step (_noise_only_forward): a zero gradient on every trainable parameter
            return sum(((p * 0).sum() for p in self.model.parameters() if p.requires_grad), logits.new_zeros(()))
        return self.dp_loss(logits, labels) if self.dp_loss is not None else self.base_loss(logits, labels)

    def before_read_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.pre_step()  # fedsgd: clip, noise, scale and account, without stepping the weights

    def on_finish(self, steps: int, batch_sizes: list[int]) -> dict[str, float]:
        if hasattr(self.hooks, "cleanup"):
            self.hooks.cleanup()  # a wrapping lives for one round only: never hooks on hooks
        self.job.state[self.state_key] = json.dumps(self.accountant.history)
        eps = epsilon_of(self.accountant.history, self.p.delta, self.p.accountant, self.p.poisson)
        # sigma, q and steps of this round: with the rounds a client reported, its whole accountant
        # history, which fedsim.privacy.summary re-accounts with dp_accounting
        composed = sum(int(h[2]) for h in self.accountant.history) - self.steps_before  # empty batches count
        return {"epsilon": eps, "delta": self.p.delta, "noise_multiplier": self.accounted_sigma,
                "sample_rate": self.q, "steps": float(composed), f"grad_sample_mode/{self.mode}": 1.0,
                **self.on_round_end()}

    @property
    def state_key(self) -> str:
        return f"{self.defense.name}/accountant-history"

    # -- extension points of the DP-SGD family (fedsim.defenses.dp_sat, fedsim.defenses.dp_sam) ------------------
    @property
    def accounted_sigma(self) -> float:
        """The noise multiplier of one accounted step (one Poisson batch): sigma / sqrt(queries per batch),
        sigma itself for DP-SGD's one query (see ``DPSGD.queries_per_step``)."""
        queries = self.defense.queries_per_step
        return self.sigma if queries == 1 else self.sigma / math.sqrt(queries)

    def account_query(self, optimizer: Any) -> None:
        """Count a released query in the accountant: one subsampled Gaussian (sigma, q) per ``pre_step``."""
        self.account(optimizer)

    def before_forward(self, x: Tensor) -> None:
        """Runs before every training forward pass on the batch ``x`` (normalized inputs, (B, C, H, W))."""

    def after_privatize(self, optimizer: Any) -> None:
        """Runs at the end of every ``pre_step`` (after the accountant counted it), when ``p.grad`` holds
        the privatized gradient and ``p.summed_grad`` the clipped, un-noised sum, before the base optimizer
        steps (fedavg) or the gradient is read (fedsgd)."""

    def on_round_end(self) -> dict[str, float]:
        """Runs when the round ends (may store into ``job.state``); extra metrics the client reports."""
        return {}

    # -- the forward the job's model runs ----------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.before_forward(x)
        mode = self.mode
        self.empty = x.shape[0] == 0
        if self.empty:
            return self._noise_only_forward(x)
        if mode == "ew":
            return self.hooks(x)
        self.hooks.enable_hooks()
        return self.model(x)

    def _noise_only_forward(self, x: Tensor) -> Tensor:
        """Poisson drew an empty batch, in any grad-sample mode: still a DP step (accounted), whose release is
        N(0, sigma^2 C^2) divided by the expected batch size, as for any batch. Opacus's per-sample machinery
        never runs on it (functorch and ew fail on 0 rows, ghost's embedding norm sampler cannot reshape 0
        rows): its hooks are off, every parameter gets empty per-sample gradients (hooks, functorch, ew clip
        and sum nothing) and :meth:`loss_fn` a zero loss, so ``p.grad`` is 0 (ghost sums ``p.grad``); the
        optimizer's ``pre_step`` then adds only its noise and scales it like a non-empty batch."""
        if self.mode != "ew":
            self.hooks.disable_hooks()
        for param in self.model.parameters():
            param.grad_sample = param.new_zeros((0, *param.shape))
        return self.model(x)  # ew: the bare model, not the ExpandedWeights wrapper


@register_defense("dp_sgd")
class DPSGD(Defense):
    Params = DPSGDParams
    audits_examples = True  # audit: example canaries (fedsim.audit)
    stage = 30
    summary = "sample-level DP-SGD (Opacus): per-example clipping + Gaussian noise, epsilon per client"
    #: the round's TrainingJob hooks (DP-SAT and DP-SAM subclass it)
    round_class: ClassVar[type[_PrivateRound]] = _PrivateRound
    #: private gradient queries on each Poisson batch (DP-SAM: 2), accounted together as one subsampled
    #: Gaussian of sigma / sqrt(queries): Gaussians compose exactly, by adding their mu = 1/sigma in quadrature
    queries_per_step: ClassVar[int] = 1

    @classmethod
    def check_scenario(cls, scenario: Scenario, spec: DefenseSpec) -> None:
        p = cls.Params.model_validate(spec.params)
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise IncompatibleDefenseError(f"{spec.name} needs exactly one of params.noise_multiplier and "
                                           "params.target_epsilon")
        family = [d.name for d in scenario.defenses if is_opacus_defense(d.name)]
        if len(family) > 1:
            raise IncompatibleDefenseError(f"{' and '.join(family)}: one Opacus DP-SGD defense at most (dp_sgd, "
                                           "dp_sat, dp_sam): two wrappings of one model would add hooks twice")

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Validation: refuse a model this setting cannot train
        (:func:`fedsim.defenses.per_sample.per_sample_problem`)."""
        import_opacus()
        from opacus.grad_sample.utils import prepare_module

        self.input_shape = tuple(int(d) for d in input_shape)  # auto's probe shape when no scenario is attached
        mode = self.params.grad_sample_mode
        if mode == "auto":  # the mode auto will run; the loss is the task's (every task loss takes reduction=)
            mode = self.mode_for(model, lambda logits, labels, reduction="mean": logits)
        problem = per_sample_problem(model, input_shape, mode, prepare_module)
        if problem is not None:
            raise IncompatibleDefenseError(problem)

    def mode_for(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> str:
        """The grad-sample mode a round of ``model`` (transformed) trained with ``loss_fn`` runs: the scenario's, or
        ``auto``'s deterministic choice (:func:`fedsim.defenses.dp_modes.resolve_mode`; probe cached per process)."""
        return resolve_mode(self, model, loss_fn)

    def transform_model(self, model: nn.Module) -> nn.Module:
        import_opacus()
        from opacus.validators import ModuleValidator

        if ModuleValidator.is_valid(model):
            return model
        vectors = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
        fixed = ModuleValidator.fix(model)  # returns a fixed copy
        for name in vectors:  # gcd(32, C) groups of ONE feature cannot normalize an (N, C) vector: one group
            parent, _, leaf = name.rpartition(".")
            setattr(fixed.get_submodule(parent), leaf, nn.GroupNorm(1, fixed.get_submodule(name).num_channels))
        errors = ModuleValidator.validate(fixed, strict=False)
        if errors:
            raise IncompatibleDefenseError(f"dp_sgd: Opacus cannot train this model: {errors[0]}")
        global _BN_NOTICE_SHOWN
        if not _BN_NOTICE_SHOWN:  # once per process: clients, server and attackers all rebuild the model
            log.warning("dp_sgd: BatchNorm layers were replaced by GroupNorm (Opacus ModuleValidator.fix): "
                        "per-example gradients need layers that do not mix examples")
            _BN_NOTICE_SHOWN = True
        return fixed

    def wrap_training(self, job: TrainingJob) -> TrainingJob:
        run = self.round_class(self, job)
        job.model = _SameKeys(job.model, run.forward)
        job.sample_batches = run.sample_batches
        job.declare_num_examples = run.declare_num_examples
        job.make_optimizer = run.make_optimizer
        job.loss_fn = run.loss_fn
        job.before_read_gradients = run.before_read_gradients
        job.on_finish.append(run.on_finish)
        return job

    def noise_multiplier_for(self, job: TrainingJob, q: float, steps: int) -> float:
        """Sigma for a client with sampling rate q and ``steps`` DP steps per round."""
        p = self.params
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise IncompatibleDefenseError(f"{self.name} needs exactly one of noise_multiplier and target_epsilon")
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        total = steps * expected_rounds(_federation_of(job, self))
        # k Gaussian queries of sigma on one Poisson batch are accounted as one of sigma / sqrt(k)
        return math.sqrt(self.queries_per_step) * solve_noise_multiplier(p.target_epsilon, p.delta, q, total,
                                                                         p.accountant)


def is_opacus_defense(name: str) -> bool:
    """Whether the registered defense ``name`` is DP-SGD or a subclass of it (DP-SAT, DP-SAM): one Opacus
    wrapping of the client's model, per-example gradients and an accountant of its own."""
    return name in DEFENSES and issubclass(DEFENSES.get(name), DPSGD)


def _federation_of(job: TrainingJob, defense: Defense) -> FederationSpec:
    """The scenario's federation block, which ``target_epsilon`` needs (rounds and client sampling).

    The defense was built with its scenario (``build_defenses``), which holds it.
    """
    if defense.scenario is not None:
        return defense.scenario.federation
    raise IncompatibleDefenseError("dp_sgd target_epsilon needs the scenario's rounds: run it in a federation "
                                   "or give noise_multiplier")
