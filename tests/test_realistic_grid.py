"""The realistic-training grids (benchmarks/grids/realistic*.yaml) and the two sweep features they need.

Kinds guarded here:

* a ``bundles`` sweep axis sets several scenario paths together under one label (a model state is the attacked
  round AND the number of rounds; a batch is the batch size AND the client's data), and its errors are reported at
  the grid path that holds the bad value;
* ``design: one_at_a_time`` runs the centre and each other value of one axis alone: its cells are counted by hand
  (1 + sum(len - 1)), never by the expansion under test;
* every cell of the fast grid validates (what ``fedsim validate`` checks: parse_scenario on each cell), and each
  cell sets exactly the values its params name;
* the study's design: at B1 and B8 a client holds more digits than one batch (several steps per epoch, so "local
  epochs" are not repeated full-batch steps), the trained model is pretrained by the whole federation (the attacked
  client a <= 10 % share) for >= 10 rounds, and the FedLeak row runs FedLeak's own distance (l1_cosine).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from fedsim.bench.expand import expand_grid
from fedsim.bench.grid import load_grid, parse_grid
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "name": "tiny",
    "base": {
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": "digits", "train_subset": 16, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "width": 1},
        "federation": {"clients": 2, "rounds": 1, "protocol": "fedavg", "local": {"batch_size": 8, "lr": 0.1}},
        "attacks": [{"name": "inverting_gradients", "rounds": [1], "clients": [0],
                     "budget": {"iterations": 1, "restarts": 1}}],
    },
    "attacks": ["inverting_gradients"],
    "sweep": {
        "federation.local.epochs": [1, 2, 5],
        "state": {"bundles": {"untrained": {"attacks.0.rounds": [1], "federation.rounds": 1},
                              "trained": {"attacks.0.rounds": [3], "federation.rounds": 3}}},
        "federation.local.augmentation": ["none", "flip_crop"],
    },
}


def tiny(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(changes))
    return raw


def test_bundles_set_every_path_of_their_label() -> None:
    cells = expand_grid(parse_grid(tiny()))
    assert len(cells) == 3 * 2 * 2  # the cross product by default
    for cell in cells:
        rounds = 1 if cell.params["state"] == "untrained" else 3
        assert cell.scenario["attacks"][0]["rounds"] == [rounds]
        assert cell.scenario["federation"]["rounds"] == rounds
        assert cell.scenario["federation"]["local"]["epochs"] == cell.params["federation.local.epochs"]
        assert cell.scenario["federation"]["local"]["augmentation"] == cell.params["federation.local.augmentation"]


def test_one_at_a_time_runs_the_centre_and_one_axis_changed() -> None:
    cells = expand_grid(parse_grid(tiny(design="one_at_a_time")))
    assert len(cells) == 1 + (3 - 1) + (2 - 1) + (2 - 1)
    centre = {"federation.local.epochs": 1, "state": "untrained", "federation.local.augmentation": "none"}
    assert cells[0].params == centre
    for cell in cells[1:]:
        changed = [k for k in centre if cell.params[k] != centre[k]]
        assert len(changed) == 1


@pytest.mark.parametrize(("sweep", "path"), [
    ({"state": {"bundles": {"a": {"federation.rounds": 0}}}}, "sweep.state.bundles.a.federation.rounds"),
    ({"state": {"bundles": {"a": {}}}}, "sweep.state.bundles.a"),
    ({"state": {"bundles": {"a": {"seed": 1}}}}, "sweep.state.bundles.a.seed"),
    ({"state": {"values": ["b"], "bundles": {"a": {"federation.rounds": 2}}}}, "sweep.state.values[0]"),
    ({"a.b": {"bundles": {"x": {"federation.rounds": 2}}}}, "sweep.a.b"),
])
def test_bad_bundles_are_refused_at_their_grid_path(sweep: dict[str, Any], path: str) -> None:
    with pytest.raises(ScenarioError) as err:
        expand_grid(parse_grid(tiny(sweep=sweep)))
    assert err.value.path == path, (err.value.path, err.value.reason)


def test_design_must_be_known() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_grid(tiny(design="latin_square"))
    assert err.value.path == "design"


@pytest.fixture(scope="module")
def fast_cells() -> list[Any]:
    return expand_grid(load_grid(ROOT / "benchmarks" / "grids" / "realistic_fast.yaml"))


def test_every_fast_cell_validates_and_sets_what_its_params_say(fast_cells: list[Any]) -> None:
    grid = load_grid(ROOT / "benchmarks" / "grids" / "realistic_fast.yaml")
    labels = [grid.attack_label(i) for i in range(len(grid.attacks))]
    assert {"inverting_gradients", "gradinversion", "fedavg_inversion", "gifd", "dia", "fedleak"} <= set(labels)
    fedleak = next(c for c in fast_cells if c.attack == "fedleak").scenario["attacks"][0]
    assert (fedleak.get("params") or {}).get("distance", "l1_cosine") == "l1_cosine"  # FedLeak as published, not
    assert fedleak["knowledge"]["local_hparams"]  # the cosine-only ablation: its L1 term needs the granted recipe
    sizes = {k: len(a.values) for k, a in grid.sweep.items()}
    expected = sum(1 + sum(n - 1 for k, n in sizes.items() if grid.sweep[k].applies(label, "none"))
                   for label in labels)
    assert len(fast_cells) == expected
    for cell in fast_cells:
        parse_scenario(cell.scenario)  # what `fedsim validate` checks, on the cell as the bench runs it
        fed, p = cell.scenario["federation"], cell.params
        batch = int(p["batch"][1:])
        assert fed["local"]["batch_size"] == batch
        held = cell.scenario["data"]["train_subset"] // fed["clients"]  # iid: each client's digits
        assert held == max(16, batch)  # 16 digits, cut into 16 / B steps where B < 16; B digits (one step) beyond
        if batch <= 8:  # the centre (B8) and B1: several SGD steps per epoch on other images, never one batch
            assert held // batch >= 2
        if p["model_state"] == "trained":  # pretrained by the whole federation: the attacked client a small share
            assert fed["rounds"] - 1 >= 10 and 1 / fed["clients"] <= 0.1 and not fed.get("clients_per_round")
        assert fed["local"]["augmentation"] == p["federation.local.augmentation"]
        attacked = cell.scenario["attacks"][0]["rounds"]
        assert attacked == ([1] if p["model_state"] == "untrained" else [fed["rounds"]]) and fed["rounds"] >= 1
        if cell.attack == "dia":
            assert fed["protocol"] == "fedsgd" and "federation.local.epochs" not in p
        else:
            assert fed["protocol"] == "fedavg" and fed["local"]["epochs"] == p["federation.local.epochs"]


@pytest.mark.slow
def test_every_full_cell_validates() -> None:
    cells = expand_grid(load_grid(ROOT / "benchmarks" / "grids" / "realistic.yaml"))
    assert len(cells) >= 5 * 3 * 4 * 2 * 2
