"""Every comparison fedsim ships varies only what it studies, and every picture is paired by outcome.

The configurations are parsed from the shipped files (multi-attack scenarios, the dropout figure's
sweep, the bench grids, the MID sweep) with every default resolved: an attack default that differs
between two compared attacks (IG's TV weight 0.01 against DIA's 1e-5, which once made the dropout
figure blame dropout for a gap the TV weight made) counts as much as a written one.

Pictures: real images encode their outcome (a constant grey level per client), so a reconstruction
drawn under another outcome's real image is caught wherever images are drawn.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
import yaml

from fedsim.report import figures
from fedsim.report.gallery import load_reconstructions, save_reconstructions
from fedsim.scenario import load_scenario
from fedsim.teaching import dia_figure
from fedsim.teaching.comparisons import (
    ATTACK_STUDIES,
    ROOT,
    Comparison,
    Study,
    attack_comparison,
    dropout_figure_comparisons,
    grid_comparisons,
    multi_attack_scenarios,
)
from fedsim.teaching.resolve import resolved_scenario

matplotlib.use("Agg")


# --- the rule itself -------------------------------------------------------------------------------


def test_a_default_that_differs_between_compared_attacks_is_caught(tmp_path: Path, tiny_raw) -> None:
    """The shape of the old dropout figure: IG and DIA compared with neither TV weight written."""
    raw = {**tiny_raw, "model": {"name": "mlp", "width": 2, "dropout": 0.25},
           "attacks": [{"name": "inverting_gradients"}, {"name": "dia"}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    # IG's restart schedule defaults to halving (issue 17), DIA's to full: a default difference too.
    assert attack_comparison(path, Study(("name",))).unexplained() == {
        "attacks[1] dia": ["params.schedule.kind", "params.tv"]}
    raw["attacks"][0]["params"] = {"schedule": {"kind": "full"}}
    path.write_text(yaml.safe_dump(raw))
    old = attack_comparison(path, Study(("name",)))
    assert old.unexplained() == {"attacks[1] dia": ["params.tv"]}
    raw["attacks"][0]["params"] = {"tv": 1e-5, "schedule": {"kind": "full"}}
    path.write_text(yaml.safe_dump(raw))
    assert attack_comparison(path, Study(("name",))).unexplained() == {}
    # A knowledge or budget difference is never a method's own parameter.
    raw["attacks"][1]["budget"] = {"iterations": 9}
    path.write_text(yaml.safe_dump(raw))
    assert attack_comparison(path, Study(("name",))).unexplained() == {"attacks[1] dia": ["budget.iterations"]}


# --- every shipped comparison ----------------------------------------------------------------------


def test_every_multi_attack_scenario_declares_what_it_studies() -> None:
    found = {str(p.relative_to(ROOT)) for p in multi_attack_scenarios()}
    assert found == set(ATTACK_STUDIES), "declare each multi-attack scenario in fedsim.teaching.comparisons"


@pytest.mark.parametrize("rel", sorted(ATTACK_STUDIES))
def test_attacks_compared_in_one_scenario_differ_only_in_the_studied_fields(rel: str) -> None:
    study = ATTACK_STUDIES[rel]
    comparison = attack_comparison(ROOT / rel, study)
    assert comparison.unexplained() == {}
    assert all(reason.strip() for reason in study.stated.values())
    header = "\n".join(line for line in (ROOT / rel).read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    for path in study.stated:  # a stated difference is stated where the reader looks: the file's header
        assert path.split(".")[-1] in header, f"{rel}: say in the header why {path} differs"


def test_dropout_figure_columns_differ_only_in_p_and_its_attacks_share_tv_lr_and_budget() -> None:
    comparisons = dropout_figure_comparisons(iterations=123)
    assert all(c.unexplained() == {} for c in comparisons), [c.unexplained() for c in comparisons]
    columns = comparisons[0]
    assert all(columns.differences(label) == {"model.dropout"} for label in list(columns.configs)[1:])
    for rows in comparisons[1:]:
        configs = list(rows.configs.values())
        assert {c["params.tv"] for c in configs} == {1e-5}  # the TV weight held equal, IG included
        assert {c["budget.iterations"] for c in configs} == {123}
        assert {c["params.lr"] for c in configs} == {0.1}


def test_the_figure_states_what_it_holds_equal() -> None:
    (_, scenario), = dia_figure.sweep_scenarios(ps=[0.0])
    line = dia_figure.held_equal(scenario)
    assert "tv 1e-05" in line and "lr 0.1" in line and "iterations 500" in line and "only in p" in line


@pytest.mark.parametrize("grid", ["fast", pytest.param("full", marks=pytest.mark.slow), "malicious"])
def test_grid_rows_differ_from_their_defense_free_cell_only_in_the_defense(grid: str) -> None:
    comparisons = grid_comparisons(ROOT / "benchmarks" / "grids" / f"{grid}.yaml")
    assert comparisons
    bad = {c.name: c.unexplained() for c in comparisons if c.unexplained()}
    assert not bad, bad


def test_mid_sweep_rows_differ_only_in_the_defense() -> None:
    spec = importlib.util.spec_from_file_location("mid_sweep", ROOT / "benchmarks" / "mid_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = yaml.safe_load(module.BASE.read_text(encoding="utf-8"))
    rows = {label: resolved_scenario(module.row_scenario(base, defenses, 4, ["gmi"], 2))
            for label, defenses in module.settings([0.0, 0.01], [1.0])}
    comparison = Comparison("mid sweep", "benchmarks/mid_sweep.py", rows, ("defenses",))
    assert comparison.unexplained() == {}
    assert all(comparison.differences(label) for label in list(rows)[1:])


# --- pictures are paired by outcome ----------------------------------------------------------------


def _grey(level: float, shape: tuple[int, ...] = (1, 3, 4, 4)) -> torch.Tensor:
    return torch.full(shape, level)


def _level(image: Any) -> float:
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    return round(float(arr.mean()), 3)


def test_dropout_figure_draws_each_reconstruction_under_its_own_outcomes_real_image(monkeypatch, tmp_path) -> None:
    """Three clients with different images (grey levels 0.1, 0.5, 0.9) and a perfect attacker: every
    reconstruction panel must sit under the real image of the same level. The old figure took the
    truth row from client 0 and the reconstructions from client 2."""
    rows = [{"p": p, "method": m, "round": 1, "client": c, "oracle": m == "dia_oracle", "psnr": 30.0 + c,
             "mse": 0.0, "iterations": 1, "seconds": 0.0, "failed": None,
             "image": _grey(level), "truth": _grey(level)}
            for p in (0.0, 0.5) for m in ("inverting_gradients", "dia", "dia_oracle")
            for c, level in ((0, 0.1), (1, 0.5), (2, 0.9))]
    drawn: list[tuple[int, int, float | None]] = []

    def record(ax, image) -> None:
        spec = ax.get_subplotspec()
        drawn.append((spec.rowspan.start, spec.colspan.start, None if image is None else _level(image)))

    monkeypatch.setattr(dia_figure, "_show", record)
    dia_figure.plot(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").is_file()
    by_column: dict[int, list[tuple[int, float | None]]] = {}
    for row, col, level in drawn:
        by_column.setdefault(col, []).append((row, level))
    truths = {0.1, 0.5, 0.9}
    for col, cells in by_column.items():
        cells.sort()
        assert {lv for _, lv in cells} == truths, "every client's images are drawn"
        blocks = [cells[i:i + 4] for i in range(0, len(cells), 4)]  # truth + 3 methods per outcome
        for block in blocks:
            assert len({lv for _, lv in block}) == 1, f"column {col}: {block} mixes outcomes"
    laid, _, _, keys = dia_figure.panels(rows)
    assert keys == [(1, 0), (1, 1), (1, 2)]
    truth_of = {(p.row, p.col): p for p in laid if p.method is None}
    for panel in (p for p in laid if p.method is not None):
        above = max((r for r, c in truth_of if c == panel.col and r < panel.row))
        assert truth_of[(above, panel.col)].key == panel.key


def _outcome(client: int, level: float, perm: list[int]) -> Any:
    """An outcome of a batch of 3 images with levels level, level+.02, level+.04, reconstructed
    perfectly but returned in the order ``perm`` (so ``order`` must undo it)."""
    from fedsim.attacking import AttackOutcome

    truth = torch.cat([_grey(level + 0.02 * i) for i in range(3)])
    recon = truth[perm]
    order = [perm.index(i) for i in range(3)]  # truth i is matched to reconstruction order[i]
    return AttackOutcome(attack="inverting_gradients", attack_index=0, round=1, partition_id=client,
                         metrics={"order": order, "psnr_per_image": [40.0, 40.0, 40.0], "psnr_mean": 40.0},
                         stats={}, seconds=0.0, failed=None, oracle=False, reconstruction=recon, truth=truth,
                         labels=None)


def test_run_figure_and_report_galleries_pair_images_by_outcome(monkeypatch, tmp_path) -> None:
    outcomes = [_outcome(0, 0.1, [2, 0, 1]), _outcome(1, 0.5, [1, 2, 0]), _outcome(2, 0.8, [0, 2, 1])]
    # reconstructions.npz -> the HTML report's galleries
    assert save_reconstructions(outcomes, tmp_path / "reconstructions.npz")
    entries = load_reconstructions(tmp_path / "reconstructions.npz")
    assert [e.client for e in entries] == [0, 1, 2]
    for entry, outcome in zip(entries, outcomes, strict=True):
        for truth, rec, _, _ in entry.pairs(8):
            assert np.array_equal(truth, rec)
        assert abs(entry.truth.mean() / 255 - float(outcome.truth.mean())) < 0.01
    # reconstructions.png: every bottom image equals the real image above it
    shown: list[tuple[int, int, float]] = []
    original = matplotlib.axes.Axes.imshow

    def imshow(ax, x, *args, **kwargs):
        spec = ax.get_subplotspec()
        shown.append((spec.rowspan.start, spec.colspan.start, round(float(np.mean(x)), 3)))
        return original(ax, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", imshow)
    assert figures.reconstruction_grid(outcomes, tmp_path / "reconstructions.png")
    grid = {(r, c): v for r, c, v in shown}
    assert len(grid) == 2 * 3 * 3
    for (r, c), v in grid.items():
        if r % 2 == 1:
            assert grid[(r - 1, c)] == v, f"row {r} column {c} under another image"


def test_a_run_with_several_clients_keeps_each_clients_own_images(tmp_path: Path, tiny_raw) -> None:
    """End to end: clients 0, 1 and 2 attacked; each outcome's real image is one of that client's own
    images (from the partition, looked up independently) and no other client's."""
    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario
    from fedsim.simulation.setup import setup_for

    raw = {**tiny_raw, "federation": {**tiny_raw["federation"], "rounds": 1, "local": {"batch_size": 1, "lr": 0.5}},
           "attacks": [{"name": "inverting_gradients", "rounds": [1], "clients": [0, 1, 2],
                        "budget": {"iterations": 2}}]}
    scenario = parse_scenario(raw)
    result = run_scenario(scenario, tmp_path / "run")
    setup = setup_for(scenario)
    own = {pid: setup.client_data(pid)[0] for pid in range(4)}
    assert sorted(o.partition_id for o in result.outcomes) == [0, 1, 2]
    for outcome in result.outcomes:
        (image,) = outcome.truth
        holders = [pid for pid, xs in own.items() if any(torch.equal(image, x) for x in xs)]
        assert holders == [outcome.partition_id]
    entries = load_reconstructions(tmp_path / "run" / "reconstructions.npz")
    for entry, outcome in zip(entries, result.outcomes, strict=True):
        assert entry.client == outcome.partition_id
        assert np.array_equal(entry.truth[0], np.round(outcome.truth[0].numpy() * 255).astype(np.uint8))


def test_tutorial_step_5_scenario_still_validates() -> None:
    assert len(load_scenario(ROOT / "scenarios" / "tutorial" / "05_dropout_is_not_a_defense.yaml").attacks) == 3
