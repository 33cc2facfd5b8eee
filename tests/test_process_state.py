"""Results do not depend on what ran before in the process, and calls leave the process as they found it.

Three kinds of shared state made one call's numbers depend on another's: attacks drew from the global
torch RNG (a MID victim samples its bottleneck with ``torch.randn_like``), so calling the same attack
on the same update twice gave different images when anything had drawn in between; a client round
reseeded the global RNG and left it so; and commands set torch's thread count for the whole process
(one thread vs two changes a 200-step GIFD result from 27.1 to 24.5 dB). A memoised evaluation
classifier was handed out as one shared object, so a caller that changed it changed every later score.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import fedsim.attack_tasks as attack_tasks
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario


def _scenario(tiny_raw: dict[str, Any], defenses: list[dict[str, Any]], attacks: list[dict[str, Any]],
              **federation: Any):
    raw = copy.deepcopy(tiny_raw)
    raw["defenses"] = defenses
    raw["federation"].update(federation)
    raw["attacks"] = attacks
    return parse_scenario(raw)


def _spec(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "rounds": [1], "clients": [1], "budget": {"iterations": 4}, **kw}


@pytest.fixture(scope="module")
def captured_attacks(tmp_path_factory) -> list[tuple[Any, Any]]:
    """(attack, the view it was given) for several attacks on a MID model (stochastic at prediction
    time) and one on a dropout model, as the runner built them."""
    from conftest import TINY

    seen: list[tuple[Any, Any]] = []
    original = attack_tasks._run_attack

    def spy(attack: Any, view: Any, progress: Any) -> Any:
        seen.append((attack, view))
        return original(attack, view, progress)

    attack_tasks._run_attack = spy
    try:
        mid = [{"name": "mid", "params": {"beta": 0.01}}]
        run_scenario(_scenario(TINY, mid, [_spec("inverting_gradients"), _spec("dlg"), _spec("gradinversion")]),
                     write=False)
        run_scenario(_scenario(TINY, mid, [_spec("fedavg_inversion", knowledge={"local_hparams": True})],
                               protocol="fedavg"), write=False)
        run_scenario(_scenario(TINY, [{"name": "dropout", "params": {"p": 0.25}}], [_spec("dia")]), write=False)
    finally:
        attack_tasks._run_attack = original
    assert [type(a).__name__ for a, _ in seen] == ["InvertingGradients", "DeepLeakage", "GradInversion",
                                                   "FedAvgInversion", "DropoutInversionAttack"]
    return seen


def test_the_same_attack_call_gives_identical_numbers_whatever_ran_before(captured_attacks, tiny_raw) -> None:
    """Each attack runs, then every other attack, a federation and some global draws, then the first
    again: bit-identical images and stats. Before the fix IG, DLG, GradInversion and FedAvg inversion
    on the MID model gave other images after ``torch.manual_seed(2)`` than after ``manual_seed(1)``."""
    first = {i: attack.reconstruct(view) for i, (attack, view) in enumerate(captured_attacks)}
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    torch.randn(17)
    run_scenario(parse_scenario(tiny_raw), write=False)
    for i in reversed(range(len(captured_attacks))):
        attack, view = captured_attacks[i]
        again = attack.reconstruct(view)
        assert first[i].failed is None and again.failed is None
        assert torch.equal(first[i].images, again.images), type(attack).__name__
        assert {k: v for k, v in first[i].stats.items() if k != "seconds"} == \
               {k: v for k, v in again.stats.items() if k != "seconds"}


def _process_state() -> tuple[Any, ...]:
    return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.get_num_threads())


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_runs_attacks_and_commands_leave_the_callers_rngs_and_threads_alone(captured_attacks, tiny_raw,
                                                                            tmp_path: Path) -> None:
    """Before: a federation left the global RNG seeded by its last client, and `fedsim run`, `fedsim
    bench`'s cells and `fedsim report` left their thread count behind for the rest of the process."""
    from fedsim.bench.cell import run_cell
    from fedsim.bench.expand import expand_grid
    from fedsim.bench.grid import parse_grid
    from fedsim.cli import app

    torch.set_num_threads(1)
    torch.manual_seed(11)
    before = _process_state()
    run_scenario(_scenario(tiny_raw, [{"name": "dropout", "params": {"p": 0.25}}], []), write=False)
    assert _same(before, _process_state()), "a federation changed the caller's RNGs or threads"
    attack, view = captured_attacks[0]
    attack.reconstruct(view)
    assert _same(before, _process_state()), "an attack changed the caller's RNGs or threads"
    scenario = tmp_path / "s.yaml"
    raw = copy.deepcopy(tiny_raw)
    raw["federation"]["rounds"] = 1
    raw["attacks"] = []
    scenario.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "run"), "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1, "`fedsim run --threads 2` left 2 threads to the rest of the process"
    raw["attacks"] = [_spec("inverting_gradients")]
    cell = expand_grid(parse_grid({"name": "t", "base": raw, "attacks": ["inverting_gradients"], "defenses": ["none"],
                                   "repeats": 1}))[0]
    record = run_cell(cell, str(tmp_path / "bench"), num_cpus=2)
    assert record["status"] == "ok", record
    assert torch.get_num_threads() == 1, "a bench cell left its thread count to the driver"


def test_a_memoised_evaluator_cannot_be_changed_by_a_caller(tmp_path, monkeypatch) -> None:
    import fedsim.metrics.evaluator as evaluator_mod
    from fedsim.scenario import DataSpec

    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(evaluator_mod, "_LOADED", {})
    first = evaluator_mod.load_evaluator(DataSpec(dataset="digits"))
    x = first.reference_x[:8].clone()
    expected = first.logits(x)
    with torch.no_grad():  # a careless caller: weights, mode and reference images changed in place
        for p in first.net.parameters():
            p.mul_(0)
    first.net.train()
    first.reference_x.zero_()
    second = evaluator_mod.load_evaluator(DataSpec(dataset="digits"))
    assert not second.net.training
    assert torch.equal(second.logits(x), expected)
    assert torch.equal(second.reference_x[:8], x)
