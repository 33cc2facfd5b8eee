"""Grid -> an ordered list of validated cells (one attack x one defense entry x one sweep point x one repeat).

Order (deterministic): repeat, then attack entry, then defense entry (pairs named in ``exclude``
left out), then the cross product of the sweep axes that apply to that (attack, defense) pair, in
the grid's key order (the last key varies fastest); with ``design: one_at_a_time`` instead the centre
(every axis at its first value) and then, axis by axis, each other value with the rest at the centre. Repeat r of every
cell uses the seed ``derive_seed(base seed, "bench-repeat", r)``, so cells of the same repeat share
their data partition, model initialisation and client sampling: defenses are compared on paired runs.

Every cell's scenario is validated with :func:`fedsim.scenario.parse_scenario` here, before anything
runs; a bad cell is reported as a :class:`ScenarioError` at the GRID path that produced the bad value
(``sweep.defenses.0.params.noise_multiplier[1]``, ``defenses[2].defenses[0].params.sigma``, ...).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from fedsim.bench.grid import Grid
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario, set_dotted
from fedsim.seeding import derive_seed


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``scenario`` is the validated scenario as a plain (JSON) mapping."""

    cell_id: str
    attack: str
    defense: str
    params: dict[str, Any]
    repeat: int
    seed: int
    scenario: dict[str, Any] = field(repr=False)
    #: (scenario dotted path, grid path) of everything the grid set over its base in this cell
    set_by: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)


def cell_id(attack: str, defense: str, params: dict[str, Any], repeat: int) -> str:
    """sha1[:12] of the canonical JSON of (attack label, defense label, params, repeat): stable across runs."""
    text = json.dumps([attack, defense, params, repeat], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a raw scenario mapping, like ``--set`` (a copy of ``value``)."""
    set_dotted(raw, dotted, copy.deepcopy(value))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``: nested mappings merged, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _attack_spec(grid: Grid, index: int, raw: dict[str, Any]) -> dict[str, Any]:
    """The cell's one attack: the entry's spec merged over the first attack of ``raw`` (the base after
    the grid's overrides: its targeting and budget; its params only if it is the same attack)."""
    entry = grid.attacks[index]
    template = copy.deepcopy((raw.get("attacks") or [{}])[0])
    if entry.spec is None:
        return template
    if template.get("name") != entry.spec["name"]:
        template.pop("params", None)
    template.pop("name", None)
    return deep_merge(template, entry.spec)


def _normal(path: str) -> str:
    """'defenses[0].params.x' -> 'defenses.0.params.x'."""
    return path.replace("[", ".").replace("]", "").lstrip(".")


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


class _CellBuilder:
    """Builds one cell's raw scenario, remembering which grid path set which scenario path."""

    def __init__(self, grid: Grid, attack_index: int, defense_index: int) -> None:
        self.grid, self.ai, self.di = grid, attack_index, defense_index
        self.sources: list[tuple[str, str]] = []  # (scenario dotted path, grid path)
        self.replaced: list[tuple[str, str]] = []  # base subtrees a grid entry replaced (not error addresses)
        self.raw = copy.deepcopy(grid.base)
        self._apply(grid.overrides, "overrides.{}")
        spec = grid.attacks[attack_index].spec
        if spec is not None:
            if (self.raw.get("attacks") or [{}])[0].get("name") != spec["name"]:
                self.replaced.append(("attacks.0.params", f"attacks[{attack_index}]"))
            self.replaced += [(f"attacks.0.{leaf}", f"attacks[{attack_index}]") for leaf in _leaves(spec)]
        self.replaced += [(f"attacks.{k}", f"attacks[{attack_index}]")  # a cell runs ONE attack
                          for k in range(1, len(self.raw.get("attacks") or []))]
        self.raw["attacks"] = [_attack_spec(grid, attack_index, self.raw)]
        self._apply(grid.attacks[attack_index].overrides, f"attacks[{attack_index}].overrides.{{}}")
        entry = grid.defenses[defense_index]
        if entry.defenses is not None:
            self.raw["defenses"] = copy.deepcopy(entry.defenses)
            self.replaced.append(("defenses", f"defenses[{defense_index}]"))
        self._apply(entry.overrides, f"defenses[{defense_index}].overrides.{{}}")

    def _apply(self, values: dict[str, Any], grid_path: str) -> None:
        for key, value in values.items():
            self.set(key, value, grid_path.format(key))

    def set(self, key: str, value: Any, grid_path: str) -> None:
        try:
            set_path(self.raw, key, value)
        except ScenarioError as err:
            hint = ""
            if grid_path.startswith("sweep.") and "no list item" in err.reason:
                hint = " (scope the axis to the entries that have it: {values: [...], defenses: [label]})"
            raise ScenarioError(grid_path, f"{err.path}: {err.reason}{hint}") from None
        self.sources.append((key, grid_path))

    def blame(self, err: ScenarioError, cell: str) -> ScenarioError:
        """Re-address a cell's scenario error to the grid path that produced the bad value."""
        path = _normal(err.path)
        suffix = f" (cell {cell})"
        for key, grid_path in reversed(self.sources):  # the latest setter of that path wins
            if _related(path, key):
                extra = "" if path == key else f"{err.path}: "
                return ScenarioError(grid_path, extra + err.reason + suffix)
        if path.startswith("attacks.0"):
            rest = err.path[len("attacks[0]"):].lstrip(".")
            return ScenarioError(f"attacks[{self.ai}]" + (f".{rest}" if rest else ""), err.reason + suffix)
        if path.startswith("defenses") and self.grid.defenses[self.di].defenses is not None:
            return ScenarioError(f"defenses[{self.di}].{err.path}", err.reason + suffix)
        return ScenarioError(f"base.{err.path}" if err.path else "base", err.reason + suffix)


def _leaves(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the non-mapping values of a nested mapping."""
    out: list[str] = []
    for key, value in mapping.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return out


def shadowed_overrides(cells: list[Cell], overrides: list[str]) -> tuple[list[ScenarioError], list[str]]:
    """The ``--set base.PATH=...`` that the grid sets again in cells (a sweep axis, an entry's overrides, defenses or
    attack spec, the grid's overrides): (errors for those that EVERY cell replaces, so the override has no effect at
    all; one-line warnings for those that only some cells replace)."""
    errors: list[ScenarioError] = []
    warnings: list[str] = []
    for item in overrides:
        key = item.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head != "base" or not rest:
            continue
        path = _normal(rest)
        hits = [next((g for q, g in c.set_by if path == q or path.startswith(q + ".")), None) for c in cells]
        setters = sorted({re.sub(r"\[\d+\]$", "", g) for g in hits if g is not None})  # axis, not its values
        if not setters:
            continue
        what = f"the grid sets {path} again ({', '.join(setters[:3])}{', ...' if len(setters) > 3 else ''})"
        if all(g is not None for g in hits):
            errors.append(ScenarioError(key, f"--set has no effect: {what} in every cell; change that instead"))
        else:
            warnings.append(f"warning: --set {key}: {what} in {sum(g is not None for g in hits)} of {len(cells)} "
                            "cells; only the others use the override")
    return errors, warnings


def _combos(sizes: list[int], design: str) -> list[tuple[int, ...]]:
    """Index tuples of the sweep points: the cross product, or the centre (all 0) and one axis at a time."""
    if design == "product":
        return list(itertools.product(*(range(n) for n in sizes)))
    centre = tuple(0 for _ in sizes)
    return [centre] + [centre[:a] + (j,) + centre[a + 1:] for a, n in enumerate(sizes) for j in range(1, n)]


def check_base_attack_execution(base: dict[str, Any]) -> None:
    """Refuse (ScenarioError at ``base.attack_execution.mode``) a base scenario asking for ``mode: ray``: a cell runs
    its attacks serially (the parallelism is across cells; no Ray tasks nested in a cell's task), so the setting, and
    the attacks' Ray-only ``resources.num_gpus`` / ``max_parallel`` with it, would be ignored. The grid itself cannot
    set ``attack_execution`` (:data:`fedsim.bench.grid.FORBIDDEN_PATHS`); a serial base is kept as it is and
    validated like any scenario."""
    execution = base.get("attack_execution")
    mode = execution.get("mode") if isinstance(execution, dict) else execution  # the shorthand: attack_execution: ray
    if mode == "ray":
        raise ScenarioError("base.attack_execution.mode", "ray, but bench cells run their attacks serially (the "
                                                          "parallelism is across cells): set mode: serial, e.g. "
                                                          "--set base.attack_execution.mode=serial")


def expand_grid(grid: Grid) -> list[Cell]:
    """Every cell of the grid in a deterministic order, each scenario validated (ScenarioError otherwise)."""
    check_base_attack_execution(grid.base)
    cells: list[Cell] = []
    base_seed = int(grid.base.get("seed", 0)) if isinstance(grid.base.get("seed", 0), int) else 0
    for repeat in range(grid.repeats):
        seed = derive_seed(base_seed, "bench-repeat", repeat)
        for ai in range(len(grid.attacks)):
            attack = grid.attack_label(ai)
            for di, entry in enumerate(grid.defenses):
                if any(rule.matches(attack, entry.label) for rule in grid.exclude):
                    continue
                axes = [(k, a) for k, a in grid.sweep.items() if a.applies(attack, entry.label)]
                for combo in _combos([len(a.values) for _, a in axes], grid.design):
                    builder = _CellBuilder(grid, ai, di)
                    params: dict[str, Any] = {}
                    for (key, axis), j in zip(axes, combo, strict=True):
                        for path, value, grid_path in axis.assignments(key, j):
                            builder.set(path, value, grid_path)
                        params[key] = axis.values[j]
                    builder.raw["seed"] = seed
                    builder.raw["backend"] = {"kind": "inprocess"}
                    shown = {k.rsplit(".", 1)[-1]: v for k, v in params.items() if k.startswith("defenses.")}
                    defense = entry.label + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
                    where = f"{attack} x {defense}" + (f" {params}" if params else "") + f", repeat {repeat}"
                    try:
                        scenario = parse_scenario(builder.raw)
                    except ScenarioError as err:
                        raise builder.blame(err, where) from None
                    if scenario.attack_execution.mode != "serial":  # any spelling check_base_attack_execution missed
                        check_base_attack_execution({"attack_execution": {"mode": scenario.attack_execution.mode}})
                    cells.append(Cell(cell_id(attack, defense, params, repeat), attack, defense, params, repeat,
                                      seed, scenario.model_dump(mode="json"),
                                      tuple(builder.sources + builder.replaced)))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.cell_id in seen:  # e.g. a sweep listing the same value twice
            raise ScenarioError("sweep", f"two cells are identical: {cell.attack} x {cell.defense} {cell.params}")
        seen[cell.cell_id] = cell
    return cells
