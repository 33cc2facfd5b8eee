"""Restart scheduling (fedsim.attacks.schedule): successive halving ranked by the matching loss alone.

References are independent of the runner: the rung plan and its cost in closed form, a toy cohort whose losses are
set by the test (the survivors must be exactly the argmin-k at each rung), and Inverting Gradients' restarts run as
the straightforward loop (one ``optimize_inputs`` per restart, the best by the gradient distance) computed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from pydantic import ValidationError
from test_inverting_gradients import convnet_update

import fedsim.attacks as attacks
from fedsim.attacks.batched import BatchedTrials, optimize_trials
from fedsim.attacks.inverting_gradients import (
    InvertingGradients,
    Trial,
    gradient_distance,
    initial_inputs,
    optimize_inputs,
    pixel_box,
    to_pixels,
)
from fedsim.attacks.label_recovery import recover_labels
from fedsim.attacks.objectives import cosine
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import NON_FINITE, TIME_LIMIT, RestartBook
from fedsim.attacks.schedule import ScheduleSpec, Sequential, planned_iterations, run_schedule, rungs
from fedsim.attacks.victim import target_gradient, victim_model
from fedsim.data import load_dataset
from fedsim.scenario import Budget, DataSpec, Knowledge
from fedsim.seeding import torch_generator

HALVING = ScheduleSpec(kind="halving")


@pytest.fixture(scope="module")
def cifar():
    return load_dataset(DataSpec(dataset="cifar10-mini"))


@pytest.mark.parametrize(("m", "n", "f"), [(3, 160, 1 / 16), (2, 64, 1 / 8), (4, 256, 1 / 16)])
def test_the_plan_costs_n_plus_m_2_to_the_m_minus_1_first_rungs(m: int, n: int, f: float) -> None:
    """K = 2^m, eta 2, first rung t0 = f N: rungs (2^m, t0), (2^(m-1), 2 t0), ..., (1, N), costing
    2^m t0 + sum_{j=1}^{m-1} 2^(m-j) 2^(j-1) t0 + (N - 2^(m-1) t0) = N + m 2^(m-1) t0 (worked out by hand)."""
    t0 = round(f * n)
    plan = rungs(ScheduleSpec(kind="halving", first_rung=f), 2**m, n)
    assert plan == [*[(2 ** (m - j), t0 * 2**j) for j in range(m)], (1, n)]
    assert planned_iterations(plan) == n + m * 2 ** (m - 1) * t0
    assert rungs(ScheduleSpec(), 2**m, n) == [(2**m, n)]  # full: one rung
    assert rungs(HALVING, 1, n) == [(1, n)]  # nothing to prune


class Toy:
    """Restarts whose loss after t steps is set by the test: ``loss(i, t)``; a restart diverges (NaN) at ``nan_at``."""

    def __init__(self, curves: list, n: int, nan_at: dict[int, int] | None = None,
                 time_up_at: tuple[int, int] | None = None) -> None:
        self.curves, self.n, self.nan_at, self.time_up_at = curves, n, nan_at or {}, time_up_at

    def steps(self, i: int, on_step):  # noqa: ANN001, ANN201
        for t in range(1, self.n + 1):
            if self.nan_at.get(i) == t:
                return (i, t - 1, NON_FINITE)
            if self.time_up_at == (i, t):  # the optimizer saw its deadline pass before step t
                return (i, t - 1, TIME_LIMIT)
            on_step(t)
            yield t, (i, t, None)
        return (i, self.n, None)

    def loss(self, i: int, t: int) -> float:
        return self.curves[i](t)


def run_toy(toy: Toy, spec: ScheduleSpec, k: int, n: int) -> tuple[RestartBook, dict[str, float], list[list[int]]]:
    """The runner over the toy; also returns which restarts each rung advanced."""
    advanced: list[list[int]] = []
    cohort = Sequential(toy.steps, lambda i, r: toy.loss(i, r[1]), lambda r: r[2], iterations=n, deadline=None)
    original = cohort.advance

    def advance(members: Sequence[int], until: int) -> bool:
        advanced.append(list(members))
        return original(members, until)

    cohort.advance = advance  # type: ignore[method-assign]
    book: RestartBook = RestartBook()
    return book, run_schedule(spec, cohort, k, n, book), advanced


def test_survivors_are_the_argmin_of_the_matching_loss_at_each_rung() -> None:
    """Crossing curves: restart i's loss is a_i / t + b_i, so the order changes between rungs; the survivors of
    every rung must be the argmin-k of the loss at that rung, recomputed here from the curves."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, generator=gen).tolist(), torch.rand(8, generator=gen).mul(0.2).tolist()
    curves = [lambda t, a=a[i], b=b[i]: a * 10 / t + b for i in range(8)]
    n = 64
    book, stats, advanced = run_toy(Toy(curves, n), ScheduleSpec(kind="halving", first_rung=1 / 8), 8, n)
    plan = rungs(ScheduleSpec(kind="halving", first_rung=1 / 8), 8, n)
    alive = list(range(8))
    expected = [alive]
    for (keep, _), (_, before) in zip(plan[1:], plan[:-1], strict=True):
        alive = sorted(sorted(alive, key=lambda i: curves[i](before))[:keep])
        expected.append(alive)
    assert advanced == expected
    assert stats["iterations_spent"] == planned_iterations(plan) == n + 3 * 4 * 8
    assert [stats[f"rung{j}_restarts"] for j in range(4)] == [8, 4, 2, 1]
    winner = expected[-1][0]
    assert book.best_restart == winner and book.best == (winner, n, None) and book.runs == 8
    assert book.best_score == curves[winner](n)


def test_diverged_restarts_rank_last_and_count_as_failed() -> None:
    """Restart 0 is the best at every step but diverges at step 3: it ranks last at the first rung and is booked as
    a failed restart; the others go on."""
    curves = [lambda t: 0.0, lambda t: 1.0, lambda t: 2.0, lambda t: 3.0]
    spec = ScheduleSpec(kind="halving", first_rung=0.25)
    book, stats, advanced = run_toy(Toy(curves, 16, nan_at={0: 3}), spec, 4, 16)
    assert advanced[1] == [1, 2]  # 0 diverged (NaN last), 3 has the highest loss
    assert book.errors == 1 and book.best_restart == 1 and stats["iterations_spent"] == 2 + 3 * 4 + 2 * 4 + 8


def test_a_time_limit_stops_every_restart_and_the_book_says_so() -> None:
    """Restart 2 meets the deadline in the first rung: restart 3 never starts, nothing is pruned or continued, the
    best of the started ones (by their loss so far) is returned and the result says time_limited."""
    curves = [lambda t: 3.0, lambda t: 1.0, lambda t: 0.5, lambda t: 0.1]
    book, stats, advanced = run_toy(Toy(curves, 16, time_up_at=(2, 3)), HALVING.model_copy(update={"first_rung": 0.25}),
                                    4, 16)
    assert advanced == [[0, 1, 2, 3]] and book.runs == 3 and book.timed_out
    assert book.best_restart == 2 and book.best == (2, 2, TIME_LIMIT) and stats["iterations_spent"] == 4 + 4 + 2


def _straight_ig(update, iterations: int, restarts: int, seed: int = 0):  # noqa: ANN001, ANN202
    """IG's restarts as the plain loop: each ``optimize_inputs`` alone, best by the final gradient distance.
    Also returns every restart's iterates (x after t steps is what the loss is called with at step t)."""
    model = victim_model(update, torch.device("cpu"))
    target = target_gradient(update, model)
    labels = recover_labels(update, 1, "auto", model=model)  # what IG infers (labels are not granted)
    box = pixel_box(update.task.mean, update.task.std, torch.device("cpu"))
    runs, iterates = [], []
    for r in range(restarts):
        seen: list[torch.Tensor] = []

        def loss(x: torch.Tensor, seen: list = seen) -> torch.Tensor:
            seen.append(x.detach().clone())
            return gradient_distance(model, x, labels, target, cosine) + 0.01 * total_variation(x)

        x0 = initial_inputs("randn", (1, *update.task.input_shape), torch_generator(seed, "ig", r))
        runs.append(optimize_inputs(loss, x0, iterations=iterations, lr=0.1, box=box))
        iterates.append(seen)

    def distance(x: torch.Tensor) -> float:
        return gradient_distance(model, x, labels, target, cosine, create_graph=False).item()

    return runs, iterates, distance


def _ig(iterations: int, restarts: int, **params) -> InvertingGradients:
    return InvertingGradients(InvertingGradients.Params(**params), Knowledge(), Budget(iterations=iterations,
                              restarts=restarts), torch.device("cpu"), 0)


def test_ig_full_is_the_plain_loop_and_halving_continues_survivors_unchanged(cifar) -> None:
    """full: bitwise the image of the plain loop's best restart. halving (K 4, N 16, rungs at 4 and 8 steps, the
    lr decays at 6, 10 and 14): the survivors are the argmin of the gradient distance of the plain runs' iterates
    at each rung, and the winner's image is bitwise its uninterrupted 16-step run (no restart from scratch, the
    step schedule of the full budget)."""
    update = convnet_update(cifar, [0], width=4)
    n, k = 16, 4
    runs, iterates, distance = _straight_ig(update, n, k)
    finals = [distance(run.x) for run in runs]
    full = _ig(n, k, schedule={"kind": "full"}).reconstruct(update)
    best = min(range(k), key=lambda r: finals[r])
    assert full.stats["best_restart"] == best and torch.equal(full.images, to_pixels(runs[best].x, update.task.mean,
                                                                                      update.task.std))
    spec = {"kind": "halving", "first_rung": 0.25}
    halved = _ig(n, k, schedule=spec).reconstruct(update)
    at4 = sorted(range(k), key=lambda r: distance(iterates[r][4]))[:2]
    winner = min(at4, key=lambda r: distance(iterates[r][8]))
    assert halved.stats["best_restart"] == winner
    assert torch.equal(halved.images, to_pixels(runs[winner].x, update.task.mean, update.task.std))
    assert halved.stats["iterations_spent"] == 4 * 4 + 2 * 4 + 1 * 8 == planned_iterations(rungs(
        ScheduleSpec(**spec), k, n))
    assert full.stats["iterations_spent"] == n * k


def test_batched_trials_prune_rows_without_disturbing_the_survivors() -> None:
    """Keeping some rows of the batched trials (inputs and Adam moments) leaves the survivors where the full
    batched run takes them, step schedule included: bitwise on the CPU (a convolution loss, 4 -> 2 -> 1 rows;
    the docstring says why a backend that picks kernels by batch size may differ in the last bits)."""
    gen = torch.Generator().manual_seed(0)
    x0, w = torch.randn(4, 2, 3, 6, 6, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    goal = torch.randn(2, 4, 4, 4, generator=gen)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.conv2d(x, w) - goal).pow(2).mean() + (x[..., 1:] - x[..., :-1]).abs().mean()

    full = optimize_trials(loss, x0, iterations=24, lr=0.1)
    trials = BatchedTrials(loss, x0, iterations=24, lr=0.1, wrap=Trial, score=lambda t: float(loss(t.x)))
    book: RestartBook = RestartBook()
    stats = run_schedule(ScheduleSpec(kind="halving", first_rung=0.25), trials, 4, 24, book)
    assert stats["iterations_spent"] == 4 * 6 + 2 * 6 + 1 * 12
    winner = book.best_restart
    assert torch.equal(book.best.x, full.x[winner])


def test_batched_trials_count_only_the_iterations_of_active_rows() -> None:
    """Trial 2 starts at 0.25 on a loss with log(x_0): signed Adam moves x_0 down by lr = 0.1 per step, so the
    loss is NaN at step index 3 (x_0 = -0.05) and the trial is frozen after 3 steps. Spent: 3 x 24 + 3 (a frozen row
    runs no more steps), the same count the sequential runner gives a restart that diverges there."""
    x0 = torch.full((4, 1, 1, 2, 2), 5.0)
    x0[2] = 0.25

    def loss(x: torch.Tensor) -> torch.Tensor:
        return x.sum() + torch.log(x.flatten()[0])

    trials = BatchedTrials(loss, x0, iterations=24, lr=0.1, wrap=Trial, score=lambda t: float(loss(t.x)))
    book: RestartBook = RestartBook()
    stats = run_schedule(ScheduleSpec(), trials, 4, 24, book)
    assert book.errors == 1 and trials.result(2)[0].iterations == 3
    assert stats["iterations_spent"] == 3 * 24 + 3


def test_every_restart_based_attack_takes_a_schedule() -> None:
    """The shared ``schedule`` field is on every restart-based attack; an unknown kind is refused with its path."""
    for name in ("inverting_gradients", "dia", "dia_oracle", "dlg", "idlg", "gradinversion", "fedavg_inversion",
                 "gan_latent", "gifd", "fedleak", "tag", "fishing"):
        params = attacks.ATTACKS.get(name).Params
        assert params.model_fields["schedule"].annotation is ScheduleSpec, name
    with pytest.raises(ValidationError, match="schedule.kind"):
        InvertingGradients.Params(schedule={"kind": "quarter"})
    with pytest.raises(ValidationError, match="lr_schedule"):
        attacks.ATTACKS.get("gan_latent").Params(schedule="constant")


def test_a_pruned_restart_never_beats_a_finished_survivor() -> None:
    """Restart 0's loss is 1.0 up to step 4 and 5.0 after, restart 1's is 2.0 throughout: the rung at step 4 keeps
    restart 0, which then finishes at 5.0. The result is the survivor (under full no intermediate iterate of a loser
    is a candidate either), not restart 1 as it was when pruned at step 4 (loss 2.0 < 5.0); both count as run."""
    curves = [lambda t: 1.0 if t <= 4 else 5.0, lambda t: 2.0]
    book, stats, advanced = run_toy(Toy(curves, 16), ScheduleSpec(kind="halving", first_rung=0.25), 2, 16)
    assert advanced == [[0, 1], [0]]
    assert book.best_restart == 0 and book.best == (0, 16, None) and book.best_score == 5.0
    assert book.runs == 2 and stats["best_pruned"] == 0.0


def test_a_pruned_restart_is_the_fallback_when_no_survivor_is_usable_and_the_stats_say_so() -> None:
    """The survivor (restart 0) diverges after the rung: the best usable restart is then the pruned one, flagged."""
    curves = [lambda t: 1.0, lambda t: 2.0, lambda t: 3.0]
    book, stats, _ = run_toy(Toy(curves, 16, nan_at={0: 10}), ScheduleSpec(kind="halving", first_rung=0.25), 3, 16)
    assert book.best_restart == 1 and book.best == (1, 8, None) and book.errors == 1 and book.runs == 3
    assert stats["best_pruned"] == 1.0
