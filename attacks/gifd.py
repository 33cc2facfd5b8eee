"""GIFD: Generative gradient Inversion via Feature Domain search (Fang, Chen, Wang, Wang, Xia; ICCV 2023).

A latent search (stage 0) can only return images inside the generator's range. GIFD then walks down
the generator: stage ``k >= 1`` optimises the *input feature* ``h_k`` of block ``k``, initialised from
the previous stage's result (block ``k-1`` run once on it), and keeps it within an L1 ball of radius
``r_k`` around that start, so each stage may leave the range a little more, but not into noise.
Per stage, with ``x = T(G_{k..}(h_k))`` the generated image mapped to the task's inputs,

    min_{h_k}  D_cos(T_def(grad_theta CE(f_theta(x), y)), g*) + alpha_TV TV(x) + alpha_n |x|_2 / (H W),

by Adam with GIFD's per-step schedule (:func:`fedsim.attacks.gan_prior.gifd_lr`); after every step the
latent is rescaled to its initial norm (stage 0) or the feature is projected onto the L1 ball
(stages >= 1; :func:`fedsim.attacks.gan_prior.project_l1_around`). At each stage's end the image and its
gradient loss are recorded. The result is the recorded image with the lowest gradient loss over all
stages and restarts (:func:`select_best`; the reference code's ``choose_optimal`` returns the last
restart's image with the best restart's score, a bug not repeated here); under ``schedule: halving`` only
the restarts never pruned are candidates unless none is usable (:func:`select_final`, ``best_pruned``).
With ``knowledge.defense`` the deterministic part of the listed defenses (clipping, pruning) is applied to
the dummy gradient (``T_def``, :mod:`fedsim.attacks.defense_aware`), as GIFD's defense experiments do.

Budget: ``budget.iterations`` is the number of optimisation steps per restart, **over all stages**
(split by ``stage_shares``, evenly by default), so GIFD and a latent-only search or Inverting
Gradients with equal ``iterations`` cost about the same. ``budget.restarts`` repeats the whole
stage sequence from fresh latents; ``schedule`` (:mod:`fedsim.attacks.schedule`) runs the restarts in full or
by successive halving on the gradient loss (rungs count steps over all stages; a restart pruned mid-stage
returns its current image as a record). Progress reports count steps over all stages and restarts.

Radii and step size: the paper's radii (1000 ... 8000) are for BigGAN/StyleGAN2 features of tens of
thousands of entries, at lr 0.1 for 1000 steps a stage. fedsim's DCGAN has block inputs of 64x7x7,
32x14x14 and 16x28x28 entries (width 32), whose post-ReLU entries average 0.3-0.5 in magnitude; the
default radius of stage k is ``RADIUS_PER_ENTRY[k-1]`` times the feature's size, i.e. a mean absolute
change per entry of 0.2, 0.2 and 0.08 (627, 1254, 1004 at width 32), and the default lr is 0.3 for
budgets of a few hundred steps. Measured on mnist-5k test digits 0-5 (untrained ConvNet width 16,
400 steps, 1 restart, ``mnist-dcgan``): these defaults 34.1 dB mean PSNR (five digits at 34-42 dB, one
stuck at 12.8 dB, 14.5 dB with 2 restarts), a quarter of the radii 30.2 dB, no L1 bound at all 23.7 dB (the search then
drifts into pixel-space artefacts), and GIFD's own lr 0.1 with radii a quarter of these 13.7 dB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fedsim.attacks.base import ProgressFn, register_attack
from fedsim.attacks.gan_prior import (
    GanPriorAttack,
    GanPriorParams,
    Run,
    Victim,
    project_l1_around,
    spherical_projection,
    variable_steps,
)
from fedsim.attacks.inverting_gradients import to_pixels
from fedsim.attacks.matching import examples_to_reconstruct
from fedsim.attacks.objectives import OBJECTIVES
from fedsim.attacks.regularizers import image_norm, total_variation
from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import OnStep, Sequential, Steps, planned_iterations, run_schedule, rungs
from fedsim.seeding import torch_generator
from fedsim.threat import ClientUpdate, Reconstruction

#: Default L1 radius of stage k (k = 1, 2, 3) per entry of block k's input (see the module docstring).
RADIUS_PER_ENTRY = (0.2, 0.2, 0.08)


@dataclass(frozen=True)
class StageRecord:
    """One stage's end: its restart, stage index, gradient loss, image (normalised space) and steps run."""

    restart: int
    stage: int
    grad_loss: float
    x: Tensor
    steps: int


@dataclass
class StageRun:
    """One restart's stage sequence so far: the records of the stages it finished, the current stage's variable
    (while one runs), the steps taken, why it stopped early, and the record of its current iterate when it was
    last scored mid-stage (``pending``: the image a restart pruned there returns)."""

    restart: int
    records: tuple[StageRecord, ...] = ()
    current: tuple[Tensor, int] | None = None
    steps: int = 0
    stopped: str | None = None
    pending: StageRecord | None = None

    def then(self, record: StageRecord, steps: int) -> StageRun:
        """This run with ``record`` appended and no stage running."""
        return StageRun(self.restart, (*self.records, record), None, steps)

    @property
    def all_records(self) -> list[StageRecord]:
        return [*self.records, *([self.pending] if self.pending is not None and self.current is not None else [])]


def _offset(steps: Steps[Run], offset: int, done: StageRun, stage: int) -> Generator[tuple[int, StageRun], None, Run]:
    """A stage's steps as restart-local ``(offset + i, StageRun so far)``; returns the stage's :class:`Run`."""
    while True:
        try:
            i, run = next(steps)
        except StopIteration as stop:
            return stop.value
        yield offset + i, StageRun(done.restart, done.records, (run.value, stage), offset + i)


def select_best(records: Sequence[StageRecord]) -> StageRecord | None:
    """The record with the lowest finite gradient loss over all stages and restarts (``None`` if none).

    The image and the score come from the same record, which is the point: GIFD's reference
    ``choose_optimal`` keeps the best restart's score but the last restart's image.
    """
    finite = [r for r in records if math.isfinite(r.grad_loss)]
    return min(finite, key=lambda r: r.grad_loss) if finite else None


def select_final(records: Sequence[StageRecord], pruned: Collection[int]) -> tuple[StageRecord | None, bool]:
    """The result's record: :func:`select_best` among the restarts never pruned by the schedule, or, when none of
    theirs is usable, among the pruned ones' records (the second value says so: ``best_pruned``).

    A pruned restart's records include its mid-stage iterate at the rung it was pruned at; under ``full`` no
    such intermediate iterate is a candidate, so ranking it against finished restarts would not be like for like
    (:func:`fedsim.attacks.schedule.run_schedule`).
    """
    best = select_best([r for r in records if r.restart not in pruned])
    if best is not None:
        return best, False
    best = select_best(records)
    return best, best is not None


def stage_steps(iterations: int, shares: Sequence[float]) -> list[int]:
    """Split ``iterations`` over stages in proportion to ``shares`` (largest remainders; sums exactly)."""
    total = float(sum(shares))
    exact = [iterations * s / total for s in shares]
    steps = [int(math.floor(e)) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: steps[i] - exact[i])[: iterations - sum(steps)]:
        steps[i] += 1
    return steps


@register_attack("gifd")
class GIFD(GanPriorAttack):
    """Stage-wise latent then feature-domain search in a generator, L1-ball bounded (Fang et al., 2023)."""

    summary = "GIFD (Fang et al. 2023): latent then intermediate-feature search of a GAN prior, L1-bounded"

    class Params(GanPriorParams):
        stages: int | None = Field(None, ge=1, description="stages to run (stage k optimises block k's input); "
                                   "default: every block of the generator")
        radii: list[float] | None = Field(None, description="L1 radius of stages 1, 2, ... (absolute); "
                                          "default: RADIUS_PER_ENTRY x the feature's size")
        stage_shares: list[float] | None = Field(None, description="relative share of budget.iterations per "
                                                 "stage; default: equal")
        lr: float = Field(0.3, gt=0, description="peak Adam step size of every stage "
                          "(GIFD: 0.1 at 1000 steps a stage)")
        norm: float = Field(1e-6, ge=0, description="weight of |x|_2 / (H W) (GIFD: 1e-6)")
        distance: Literal["cosine", "l2"] = Field("cosine", description="gradient distance (GIFD: cosine)")

        @model_validator(mode="after")
        def _lengths(self) -> GIFD.Params:
            if self.radii is not None and any(not (r > 0 and math.isfinite(r)) for r in self.radii):
                raise ValueError("radii must be finite and > 0")
            if self.stage_shares is not None and (any(not (s > 0 and math.isfinite(s)) for s in self.stage_shares)):
                raise ValueError("stage_shares must be finite and > 0")
            if self.stages is not None:
                if self.radii is not None and len(self.radii) < self.stages - 1:
                    raise ValueError(f"{self.stages} stages need {self.stages - 1} radii, got {len(self.radii)}")
                if self.stage_shares is not None and len(self.stage_shares) != self.stages:
                    raise ValueError(f"{self.stages} stages need {self.stages} stage_shares, "
                                     f"got {len(self.stage_shares)}")
            return self

    def _plan(self, num_blocks: int, feature_sizes: Sequence[int]) -> tuple[list[int], list[float]] | str:
        """Steps per stage and the L1 radii of stages 1.., or why the parameters do not fit the prior."""
        p = self.params
        stages = num_blocks if p.stages is None else p.stages
        if stages > num_blocks:
            return f"params.stages is {stages}, but the prior's generator has {num_blocks} blocks"
        shares = p.stage_shares or [1.0] * stages
        if len(shares) != stages:
            return f"{stages} stages need {stages} stage_shares, got {len(shares)}"
        if p.radii is not None:
            if len(p.radii) < stages - 1:
                return f"{stages} stages need {stages - 1} radii, got {len(p.radii)}"
            radii = list(p.radii[: stages - 1])
        else:
            radii = [RADIUS_PER_ENTRY[min(k, len(RADIUS_PER_ENTRY)) - 1] * feature_sizes[k] for k in range(1, stages)]
        return stage_steps(self.budget.iterations, shares), radii

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        p, budget = self.params, self.budget
        victim = self.victim(update)
        if isinstance(victim, Reconstruction):
            return victim
        gen = victim.prior.generator
        sizes = [math.prod(gen.block_input_shape(k)) for k in range(gen.num_blocks)]
        plan = self._plan(gen.num_blocks, sizes)
        if isinstance(plan, str):
            return Reconstruction.failure(plan)
        steps, radii = plan
        distance, (h, w) = OBJECTIVES[p.distance], victim.prior.size
        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        num = examples_to_reconstruct(update)

        def loss_at(stage: int) -> Callable[[Tensor], Tensor]:
            def loss_fn(v: Tensor) -> Tensor:
                x = victim.prior.render(v, stage)
                loss = victim.grad_loss(x, distance)
                if p.tv > 0:
                    loss = loss + p.tv * total_variation(x)
                return loss + p.norm * image_norm(x) / (h * w) if p.norm > 0 else loss
            return loss_fn

        def image(v: Tensor, stage: int) -> tuple[Tensor, float]:
            """The boxed image of stage ``stage``'s variable ``v`` and its gradient loss."""
            with torch.no_grad():
                x = torch.maximum(torch.minimum(victim.prior.render(v, stage), victim.box[1]), victim.box[0])
            return x.detach(), victim.grad_loss(x, distance, create_graph=False).item()

        def start_restart(restart: int, on_step: OnStep) -> Steps[StageRun]:
            """The whole stage sequence of one restart, one step at a time (restart-local step counts)."""
            done = StageRun(restart)
            v = gen.sample_latent(num, torch_generator(self.seed, "gifd", restart)).to(self.device)
            offset = 0
            for stage, n in enumerate(steps):
                v0 = v
                if stage == 0:
                    norms = v0.flatten(1).norm(dim=1)
                    project = lambda u, norms=norms: spherical_projection(u, norms)  # noqa: E731
                else:
                    project = lambda u, v0=v0, r=radii[stage - 1]: project_l1_around(u, v0, r)  # noqa: E731
                run = yield from _offset(variable_steps(loss_at(stage), v0, steps=n, lr=p.lr, schedule="gifd",
                                                        project=project, deadline=deadline,
                                                        on_step=lambda i, o=offset: on_step(o + i)),
                                         offset, done, stage)
                x, score = image(run.value, stage)
                offset += n
                if run.stopped == "non-finite loss":
                    score = math.nan
                done = done.then(StageRecord(restart, stage, score, x, run.steps), offset)
                if run.stopped is not None:
                    return replace(done, stopped=run.stopped)
                if stage + 1 < len(steps):
                    with torch.no_grad():
                        v = gen.forward_blocks(run.value, stage, stage + 1)  # h_{k+1} = block k(h_k)
            return done

        def score(restart: int, run: StageRun) -> float:
            """Ranked by the gradient loss alone: of the best stage end, or, mid-stage, of the current iterate
            (kept as a record, so a restart pruned there returns that image)."""
            if run.current is not None:
                value, stage = run.current
                x, loss = image(value, stage)
                run.pending = StageRecord(restart, stage, loss, x, run.steps - sum(r.steps for r in run.records))
            best = select_best(run.all_records)
            return math.nan if best is None else best.grad_loss

        book: RestartBook[StageRun] = RestartBook()
        cohort = Sequential(start_restart, score, lambda run: run.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(p.schedule, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        started = [cohort.result(i)[0] for i in range(budget.restarts) if cohort.started(i)]
        records = [record for run in started for record in run.all_records]
        stopped = {run.stopped for run in started if run.stopped is not None}
        if book.timed_out:
            stopped.add("time limit")
        return self._result(update, victim, records, stopped, time.perf_counter() - start, schedule, book.pruned)

    def _result(self, update: ClientUpdate, victim: Victim, records: list[StageRecord], stopped: set[str],
                seconds: float, schedule: dict[str, float], pruned: Collection[int]) -> Reconstruction:
        best, best_pruned = select_final(records, pruned)
        pool = records if best_pruned else [r for r in records if r.restart not in pruned]
        restarts = float(len({r.restart for r in records}))
        if best is None:
            why = "the loss became NaN/inf" if records else "the time limit hit before any step"
            return Reconstruction.failure(f"no usable stage: {why}", seconds=seconds, restarts=restarts)
        stats = {
            "grad_loss": best.grad_loss,
            "best_restart": float(best.restart),
            "best_stage": float(best.stage),
            "iterations": float(sum(r.steps for r in records if r.restart == best.restart)),
            "restarts": restarts,
            "failed_stages": float(sum(not math.isfinite(r.grad_loss) for r in records)),
            "time_limited": float("time limit" in stopped),
            **schedule,
            "best_pruned": float(best_pruned),
            "seconds": seconds,
        }
        for stage in sorted({r.stage for r in pool}):  # each stage's best over the candidates: where it helped
            losses = [r.grad_loss for r in pool if r.stage == stage and math.isfinite(r.grad_loss)]
            if losses:
                stats[f"stage{stage}_grad_loss"] = min(losses)
        if victim.transform is not None:
            stats["defenses_modeled"] = float(len(victim.transform.defenses))
        return Reconstruction(images=to_pixels(best.x, update.task.mean, update.task.std),
                              labels=victim.labels.cpu(), stats=stats)
