"""Restart scheduling shared by every restart-based attack: ``full`` (every restart runs the whole budget) or
``halving`` (successive halving; Jamieson & Talwalkar, AISTATS 2016; the bracket of Hyperband, Li et al., JMLR 2018).

``halving`` runs all K restarts for a first rung of ``t_0 = first_rung * budget.iterations`` iterations, keeps the
``ceil(n / eta)`` restarts with the lowest CURRENT matching loss (the attack's own gradient distance: the attacker has
no ground truth to rank by, and the scorer a restart is ranked with never sees any), runs those to ``eta * t_0``, and
so on, until ``min_keep`` restarts are left; they run to ``budget.iterations``. Rung j ends at ``t_j = min(N, ceil(eta
* t_{j-1}))`` with ``n_j = max(min_keep, ceil(n_{j-1} / eta))`` restarts alive, so the cost is ``sum_j n_j (t_j -
t_{j-1})`` iterations (:func:`planned_iterations`): for K = 8, eta 2 and first rung N / 8 (the defaults) that is 2.5 N
instead of 8 N. The defaults were measured with ``benchmarks/restart_schedule.py`` (Inverting Gradients, 8 restarts x
2000 iterations, 1 thread): a first rung of N / 8 matched the full run's PSNR on ConvNet (-0.04 dB over 6 seeds, at
0.29x its wall time) and LeNet; N / 16 lost 0.9 dB on ConvNet (the ranking at 125 of 2000 iterations, before the first
learning-rate step, picked a worse restart on 2 of 6 seeds) while matching on LeNet. A survivor is continued, never
restarted: its optimizer state and learning-rate schedule go on exactly as in an uninterrupted run (the schedules are
functions of the step index in the full budget), so the best restart under ``halving`` is bitwise the run it would
have been under ``full``.

Every restart is an object the attack builds from a generator (the :data:`Steps` protocol): it yields
``(iterations done, result so far)`` after every optimizer step and returns its final result; the runner advances it,
scores it with the attack's matching loss, and drops the losers. The attack's :class:`~fedsim.attacks.restarts.
RestartBook` receives every started restart (a pruned one with the score it was pruned at, as a candidate only when no
survivor is usable), so the bookkeeping (runs, failed restarts, time limit, the best restart by its matching loss)
is the same for both kinds. ``full``
runs restart 0 to the end, then restart 1, ..., exactly the loop the attacks ran before this module existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from fedsim.attacks.base import ProgressFn
from fedsim.attacks.restarts import NON_FINITE, TIME_LIMIT, RestartBook, past

T = TypeVar("T")
PROGRESS_EVERY = 50
#: ``(iterations done, the result if it stopped now)`` after each step; the generator returns the final result.
Steps = Generator[tuple[int, T], None, T]
OnStep = Callable[[int], None]
#: The ``schedule`` field's description in every restart-based attack's params.
SCHEDULE_HELP = ("restart schedule: {kind: full} runs every restart to budget.iterations; {kind: halving, eta: 2, "
                 "first_rung: 0.125, min_keep: 1} keeps the 1/eta restarts with the lowest matching loss per rung "
                 "(successive halving, fedsim.attacks.schedule)")


def run_to_end(steps: Steps[T]) -> T:
    """Drive a restart's generator to its end and return its final result (one restart alone)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class ScheduleSpec(BaseModel):
    """``schedule`` of a restart-based attack's params: ``{kind: full}`` or ``{kind: halving, eta, first_rung,
    min_keep}`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["full", "halving"] = Field("full", description="full: every restart runs budget.iterations; "
                                             "halving: successive halving by the matching loss. A halving plan that "
                                             "would prune nothing (restarts <= min_keep, an eta too small to drop "
                                             "one, a first rung as long as the budget) runs as full and its stats "
                                             "say so: schedule_halving 0, one rung")
    eta: float = Field(2.0, gt=1, description="halving: keep ceil(n / eta) restarts per rung; rungs grow eta-fold")
    first_rung: float = Field(1 / 8, gt=0, description="halving: length of the first rung as a fraction "
                              "of budget.iterations, below 1 (1 would run every restart to the end: use kind: full)")
    min_keep: int = Field(1, ge=1, description="halving: restarts that run to the end")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        """``schedule: halving`` / ``schedule: full`` mean ``{kind: ...}``; any other non-mapping is refused by
        naming the forms (never the Python class)."""
        if isinstance(data, str):
            if data not in ("full", "halving"):
                raise ValueError(f"{data!r} is not a schedule: write full or halving, or {{kind: halving, eta: 2, "
                                 "first_rung: 0.125, min_keep: 1}")
            return {"kind": data}
        if data is not None and not isinstance(data, dict | BaseModel):
            raise ValueError(f"{data!r} is not a schedule: write full or halving, or {{kind: halving, eta: 2, "
                             "first_rung: 0.125, min_keep: 1}")
        return data

    @field_validator("first_rung")
    @classmethod
    def _first_rung_below_one(cls, value: float) -> float:
        if value >= 1:
            raise ValueError(f"{value:g} is the whole budget: no restart would ever be pruned (that is kind: full); "
                             "use a fraction below 1 (default 0.125)")
        return value


def rungs(spec: ScheduleSpec, restarts: int, iterations: int) -> list[tuple[int, int]]:
    """``[(restarts alive, iteration the rung ends at), ...]``; the last rung ends at ``iterations``.

    ``full`` (or nothing to prune): one rung ``(restarts, iterations)``.
    """
    if spec.kind == "full" or restarts <= spec.min_keep:
        return [(restarts, iterations)]
    plan: list[tuple[int, int]] = []
    alive, until = restarts, max(1, round(spec.first_rung * iterations))
    while alive > spec.min_keep and until < iterations:
        plan.append((alive, until))
        alive, until = max(spec.min_keep, math.ceil(alive / spec.eta)), min(iterations, math.ceil(until * spec.eta))
    plan.append((alive, iterations))
    return plan if prunes(plan) else [(restarts, iterations)]  # nothing pruned: exactly full's plan


def prunes(plan: Sequence[tuple[int, int]]) -> bool:
    """Does ``plan`` (:func:`rungs`) ever drop a restart? ``schedule_halving`` in the stats is this, not the kind
    asked for: a halving plan that prunes nothing ran as full."""
    return any(later[0] < earlier[0] for earlier, later in zip(plan, plan[1:], strict=False))


def planned_iterations(plan: Sequence[tuple[int, int]]) -> int:
    """``sum_j n_j (t_j - t_{j-1})``: the iterations a plan spends when no restart stops early."""
    spent, before = 0, 0
    for alive, until in plan:
        spent, before = spent + alive * (until - before), until
    return spent


def keep_rows(optimizer: torch.optim.Optimizer, x: Tensor, index: Sequence[int]) -> Tensor:
    """Rows ``index`` of the stacked restarts ``x`` (dim 0) as a new leaf that ``optimizer`` (one parameter
    group holding ``x`` alone) steps from now on, with those rows of its per-element state (Adam's moments) and
    its scalar state (the step count) carried over unchanged: the survivors go on as if nothing was dropped."""
    idx = torch.tensor(list(index), device=x.device)
    kept = x.detach()[idx].clone().requires_grad_(True)
    state = optimizer.state.pop(x, {})
    optimizer.param_groups[0]["params"] = [kept]
    if state:
        optimizer.state[kept] = {k: v if v.dim() == 0 else v[idx].clone() for k, v in state.items()}
    return kept


class Cohort(Protocol[T]):
    """K restarts the runner advances, scores and prunes (:class:`Sequential`, or batched trials)."""

    def advance(self, members: Sequence[int], until: int) -> bool:
        """Run ``members`` (ascending) to iteration ``until``; False when the deadline stopped them."""

    def started(self, i: int) -> bool: ...

    def result(self, i: int) -> tuple[T, str | None]:
        """Restart ``i``'s result so far (final when it stopped) and why it stopped early, if it did."""

    def score(self, i: int) -> float:
        """Restart ``i``'s current matching loss (NaN/inf when it diverged)."""

    def drop(self, members: Sequence[int]) -> None:
        """``members`` are pruned: they will not be advanced again."""

    def spent(self) -> int:
        """Iterations run so far, over all restarts."""


class _Run(Generic[T]):
    """One restart driven from its generator."""

    def __init__(self, steps: Steps) -> None:
        self.steps, self.done = steps, 0
        self.current: T | None = None
        self.final: T | None = None

    def advance(self, until: int, total: int) -> None:
        while self.final is None and (self.done < until or until >= total):
            try:
                self.done, self.current = next(self.steps)
            except StopIteration as stop:
                self.final = stop.value

    @property
    def result(self) -> T:
        return self.final if self.final is not None else self.current  # type: ignore[return-value]


class Sequential(Generic[T]):
    """Restarts run one after another (each ``start(i, on_step)`` generator alone).

    ``score(i, result)`` is the attack's matching loss of restart ``i``'s result; ``stopped(result)`` why it
    stopped early.
    Progress: ``progress(iterations spent, planned)`` every :data:`PROGRESS_EVERY` steps of a restart and at
    its end, in the order the iterations run.
    """

    def __init__(self, start: Callable[[int, OnStep], Steps], score: Callable[[int, T], float],
                 stopped: Callable[[T], str | None], *, iterations: int, deadline: float | None,
                 progress: ProgressFn | None = None, planned: int = 0,
                 around: Callable[[int], Callable[[], None]] | None = None) -> None:
        self.start, self.score_of, self.stopped_of = start, score, stopped
        self.iterations, self.deadline, self.progress, self.planned = iterations, deadline, progress, planned
        self.around = around  # around(i)() -> undo: set up restart i's state on a shared model (DIA's masks)
        self.runs: dict[int, _Run[T]] = {}
        self._scores: dict[int, tuple[int, float]] = {}
        self._origin = 0
        self._spent = 0

    def _on_step(self, step: int) -> None:
        if self.progress is not None and (step % PROGRESS_EVERY == 0 or step == self.iterations):
            self.progress(self._origin + step, self.planned)

    def advance(self, members: Sequence[int], until: int) -> bool:
        for i in members:
            run = self.runs.get(i)
            if run is None:
                if past(self.deadline):
                    return False
                run = self.runs[i] = _Run(self.start(i, self._on_step))
            before = run.done
            self._origin = self._spent - before
            undo = self.around(i) if self.around is not None else None
            try:
                run.advance(until, self.iterations)
            finally:
                if undo is not None:
                    undo()
            self._spent += run.done - before
            if self.stopped_of(run.result) == TIME_LIMIT:
                return False
        return True

    def started(self, i: int) -> bool:
        return i in self.runs

    def result(self, i: int) -> tuple[T, str | None]:
        result = self.runs[i].result
        return result, self.stopped_of(result)

    def score(self, i: int) -> float:
        run = self.runs[i]
        cached = self._scores.get(i)
        if cached is None or cached[0] != run.done:
            result = run.result
            cached = self._scores[i] = (run.done, math.nan if self.stopped_of(result) == NON_FINITE
                                        else self.score_of(i, result))
        return cached[1]

    def drop(self, members: Sequence[int]) -> None:
        for i in members:
            self.runs[i].steps.close()

    def spent(self) -> int:
        return self._spent


def run_schedule(spec: ScheduleSpec, cohort: Cohort[T], restarts: int, iterations: int,
                 book: RestartBook[T]) -> dict[str, float]:
    """Run ``restarts`` restarts of ``iterations`` under ``spec``; book every started one in ``book``.

    Ranking at a rung uses ``cohort.score`` (the attack's matching loss) alone, NaN/inf last, ties by restart index.
    Stops everything once the deadline is past (the book then says ``time_limited``). The best restart is chosen
    among the restarts never pruned (those that reached the last rung, or the deadline, unpruned), like for like
    with ``full``, where no intermediate iterate of a loser is a candidate: a restart pruned at an earlier rung can
    score lower there than a survivor at its end when the matching loss is not monotone (signed Adam, a loss that
    adds a prior). Pruned restarts are booked with the loss they were pruned at and count in ``runs``; only when no
    survivor is usable (all diverged) is the best of them returned, and ``best_pruned`` is 1.
    Returns the schedule's stats: ``schedule_halving`` (0/1: 1 when the plan prunes, 0 for full and for a halving
    plan that prunes nothing, which runs as full; with kind halving also ``schedule_eta``,
    ``schedule_first_rung`` and ``schedule_min_keep``), ``rungs``, ``rung{j}_restarts`` and
    ``rung{j}_iterations`` (the iteration rung j ends at), ``best_pruned`` (0/1), ``iterations_spent`` (over all
    restarts).
    """
    plan = rungs(spec, restarts, iterations)
    alive, pruned = list(range(restarts)), {}
    stats = {"schedule_halving": float(prunes(plan)), "rungs": 0.0}  # 1 only when restarts really were pruned
    if spec.kind == "halving":  # the plan's parameters, recorded with the result (metrics.json, bench cells)
        stats.update(schedule_eta=spec.eta, schedule_first_rung=spec.first_rung, schedule_min_keep=float(spec.min_keep))
    for j, (keep, until) in enumerate(plan):
        if j > 0:
            scores = {i: cohort.score(i) for i in alive}
            ranked = sorted(alive, key=lambda i: (scores[i] if math.isfinite(scores[i]) else math.inf, i))
            cut = ranked[keep:]
            pruned.update({i: scores[i] for i in cut})
            cohort.drop(cut)
            alive = sorted(ranked[:keep])
        stats.update({f"rung{j}_restarts": float(len(alive)), f"rung{j}_iterations": float(until),
                      "rungs": float(j + 1)})
        if not cohort.advance(alive, until):
            book.timed_out = True
            break
    for i in range(restarts):  # the best is chosen among the restarts that were never pruned ...
        if cohort.started(i) and i not in pruned:
            result, stopped = cohort.result(i)
            book.record(i, result, cohort.score(i), stopped)
    fallback = book.best is None  # ... unless none of them is usable: then among the pruned ones, flagged
    for i in sorted(pruned):
        result, stopped = cohort.result(i)
        book.record(i, result, pruned[i], stopped, candidate=fallback)
    book.pruned.update(pruned)
    stats["best_pruned"] = float(book.best is not None and book.best_restart in pruned)
    stats["iterations_spent"] = float(cohort.spent())
    return stats
