"""Scenario shorthands and honest schedule stats (issue 17 QA F7, F8).

F7: ``schedule: halving`` / ``attack_execution: ray`` are the ``{kind: ...}`` / ``{mode: ...}`` blocks; a wrong
value names the field and the accepted forms, and no error names a Python class (any block given a scalar).
F8: a halving plan that can never prune runs as full and says so (``schedule_halving`` 0, one rung);
``first_rung: 1`` is refused at its field.
"""

from __future__ import annotations

import re

import pytest

from fedsim.attacks.restarts import RestartBook
from fedsim.attacks.schedule import ScheduleSpec, Sequential, planned_iterations, run_schedule, rungs
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

BASE = {
    "name": "shorthand", "seed": 0, "device": "cpu",
    "data": {"dataset": "cifar10-mini", "partition": {"kind": "iid"}},
    "model": {"name": "lenet"},
    "federation": {"clients": 2, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 2}},
    "attacks": [{"name": "inverting_gradients", "budget": {"iterations": 8, "restarts": 2}}],
}
#: a CamelCase word: how pydantic names a model class ("instance of ScheduleSpec")
CLASS_NAME = re.compile(r"\b[A-Z][a-z0-9]+[A-Z]\w*|instance of")


def scenario(**changes: object):  # noqa: ANN201 - a Scenario
    doc = {**BASE, "attacks": [dict(BASE["attacks"][0])]}
    for path, value in changes.items():
        if path == "schedule":
            doc["attacks"][0]["params"] = {"schedule": value}
        else:
            doc[path] = value
    return parse_scenario(doc)


def error(**changes: object) -> str:
    with pytest.raises(ScenarioError) as err:
        scenario(**changes)
    text = str(err.value)
    assert "\n" not in text and not CLASS_NAME.search(text), text
    return text


def test_the_shorthands_are_the_blocks() -> None:
    from fedsim.attacks.inverting_gradients import InvertingGradients

    scenario(schedule="halving")  # validation accepts it ...
    for word in ("full", "halving"):  # ... and the attack runs the block
        assert InvertingGradients.Params.model_validate({"schedule": word}).schedule == ScheduleSpec(kind=word)
    assert scenario(attack_execution="ray").attack_execution.mode == "ray"
    assert scenario(attack_execution="serial").attack_execution.mode == "serial"


def test_a_wrong_value_names_the_field_and_the_forms_never_a_class() -> None:
    assert error(schedule="halfing").startswith("attacks[0].params.schedule: 'halfing' is not a schedule: "
                                                "write full or halving")
    assert error(schedule=3).startswith("attacks[0].params.schedule: 3 is not a schedule")
    assert error(attack_execution="paralel").startswith("attack_execution: 'paralel' is not an execution mode: "
                                                        "write serial or ray")
    # the kind: any block given a scalar or a list (pydantic's message names the model class)
    assert error(federation=3) == "federation: Input should be a block of fields (name: value, ...), not 3"
    assert error(data=[1, 2]).startswith("data: Input should be a block of fields")
    assert error(audit="x").startswith("audit: Input should be a block of fields")  # an optional block (a union)


class Flat:
    """Restarts whose matching loss is their index; a restart is its iteration count."""

    def steps(self, i: int, on_step):  # noqa: ANN001, ANN201
        for t in range(1, 17):
            on_step(t)
            yield t, t
        return 16


@pytest.mark.parametrize(("spec", "restarts"), [
    (ScheduleSpec(kind="halving", min_keep=9), 8),  # min_keep >= restarts
    (ScheduleSpec(kind="halving", eta=1.5), 2),  # ceil(2 / 1.5) = 2: nobody is ever dropped
    (ScheduleSpec(kind="halving", first_rung=0.99), 8),  # round(0.99 * 16) = 16: the first rung is the budget
])
def test_a_plan_that_never_prunes_runs_as_full_and_says_so(spec: ScheduleSpec, restarts: int) -> None:
    assert rungs(spec, restarts, 16) == [(restarts, 16)]
    toy = Flat()
    cohort = Sequential(toy.steps, lambda i, r: float(i), lambda r: None, iterations=16, deadline=None)
    stats = run_schedule(spec, cohort, restarts, 16, RestartBook())
    assert stats["schedule_halving"] == 0 and stats["rungs"] == 1
    assert stats["iterations_spent"] == restarts * 16  # every restart ran the whole budget: full's cost
    pruning = run_schedule(ScheduleSpec(kind="halving"), Sequential(toy.steps, lambda i, r: float(i), lambda r: None,
                                                                    iterations=16, deadline=None), 8, 16, RestartBook())
    assert pruning["schedule_halving"] == 1 and pruning["iterations_spent"] < 8 * 16
    assert pruning["iterations_spent"] == planned_iterations(rungs(ScheduleSpec(kind="halving"), 8, 16))


def test_first_rung_one_is_refused_at_its_field() -> None:
    assert error(schedule={"kind": "halving", "first_rung": 1}).startswith(
        "attacks[0].params.schedule.first_rung: 1 is the whole budget")
