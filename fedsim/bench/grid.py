"""The benchmark grid schema: a YAML file naming a base scenario, attacks, defenses, sweeps and repeats.

```yaml
name: fast                        # default: the grid file's stem
base: ../../scenarios/quickstart.yaml   # a scenario file (relative to this file) or an inline mapping
overrides: {federation.rounds: 1}       # dotted scenario paths set in every cell
attacks:                          # each cell runs exactly ONE attack
  - inverting_gradients           # a name: the base's first attack spec (rounds, clients, budget) with it
  - {name: dlg, budget: {iterations: 50}}          # a (partial) attack spec, merged over that template
  - {label: ig-known, spec: {name: inverting_gradients, knowledge: {labels: known}},
     overrides: {federation.local.batch_size: 4}}  # label + spec + scenario overrides for this entry
defenses:                         # each entry REPLACES the base's defenses
  - none                          # no defense
  - gaussian_noise                # one defense with its default params
  - {label: dp_sgd, defenses: [{name: dp_sgd, params: {noise_multiplier: 1.0}}]}
exclude:                          # (attack, defense) label pairs not to run, e.g. incompatible ones
  - {attack: dlg, defense: dp_sgd, reason: "..."}
sweep:                            # dotted scenario path -> values (the cross product is run)
  federation.local.batch_size: [1, 4]
  defenses.0.params.noise_multiplier: {values: [0.5, 1.0], defenses: [dp_sgd]}   # scoped to a label
  model_state:                    # a NAMED axis: each value is a label for several paths set together
    bundles: {untrained: {attacks.0.rounds: [1], federation.rounds: 1},
              trained: {attacks.0.rounds: [5], federation.rounds: 5}}
design: product                   # or one_at_a_time: each axis's FIRST value is the centre; the centre
                                  # cell plus every other value of one axis with the rest at the centre
repeats: 2                        # seeds derived per repeat (fedsim.seeding.derive_seed)
resources: {num_cpus: 1, num_gpus: 0}                  # per cell
ray: {address: null, init_args: {}}                     # null: a local Ray; 'auto' / 'ray://...': a cluster
max_parallel: null                # cells in flight at once (default: as many as Ray's resources allow)
```

Expansion (:mod:`fedsim.bench.expand`) turns this into cells and validates every cell's scenario
before anything runs. Each cell's federation runs on the **in-process** backend: the parallelism is
across cells (one Ray task per cell); nesting a Ray simulation inside a Ray task would start Ray
actors from a Ray worker and fight over the same CPUs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsim.errors import ScenarioError
from fedsim.scenario import _first_error, _PathError, apply_overrides, path_component, read_yaml

FORBIDDEN_PATHS = {"seed": "seeds come from 'repeats'", "backend": "cells always run on the in-process backend",
                   "name": "the cell name is the base scenario's",
                   "attack_execution": "cells attack serially (the parallelism is across cells)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_paths(paths: dict[str, Any], where: str) -> None:
    for key in paths:
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise _PathError(f"{where}.{key}", "not a dotted path such as federation.local.batch_size")
        if parts[0] in FORBIDDEN_PATHS:
            raise _PathError(f"{where}.{key}", f"cannot be set ({FORBIDDEN_PATHS[parts[0]]})")


class AttackEntry(_Strict):
    """One attack of the grid. ``spec`` None: the base scenario's first attack as it is."""

    label: str = ""
    spec: dict[str, Any] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted scenario path -> value")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"label": value, "spec": {"name": value}}
        if isinstance(value, dict) and "spec" not in value and "name" in value:  # a flat attack spec
            rest = {k: v for k, v in value.items() if k not in ("label", "overrides")}
            return {"label": value.get("label", ""), "spec": rest, "overrides": value.get("overrides", {})}
        return value


class DefenseEntry(_Strict):
    """One defense configuration: ``defenses`` replaces the base's list (None keeps it, [] is 'none')."""

    label: str
    defenses: list[dict[str, Any]] | None = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted scenario path -> value")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"label": value, "defenses": [] if value == "none" else [{"name": value}]}
        if isinstance(value, dict) and "defenses" not in value and "name" in value:  # one flat defense spec
            spec = {k: v for k, v in value.items() if k not in ("label", "overrides")}
            return {"label": value.get("label", value["name"]), "defenses": [spec],
                    "overrides": value.get("overrides", {})}
        return value


class SweepAxis(_Strict):
    """Values of one dotted scenario path, optionally only in cells of some defense/attack labels.

    With ``bundles`` (label -> {dotted path: value}) the axis's key is only its name: each value is a
    label, and the cell sets every path of that label's bundle (e.g. a model state that sets both the
    attacked round and the number of rounds); ``values`` are then the labels, in the bundles' order.
    """

    values: list[Any] = Field(min_length=1)
    bundles: dict[str, dict[str, Any]] | None = Field(None, description="label -> paths set together")
    defenses: list[str] | None = Field(None, description="defense labels this axis applies to (default: all)")
    attacks: list[str] | None = Field(None, description="attack labels this axis applies to (default: all)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("bundles"), dict) and "values" not in value:
            return {**value, "values": list(value["bundles"])}
        return {"values": value} if isinstance(value, list) else value

    def assignments(self, key: str, index: int) -> list[tuple[str, Any, str]]:
        """``(scenario path, value, grid path)`` that value ``index`` of axis ``key`` sets in a cell."""
        value = self.values[index]
        if self.bundles is None:
            return [(key, value, f"sweep.{key}[{index}]")]
        return [(path, v, f"sweep.{key}.bundles.{value}.{path}") for path, v in self.bundles[str(value)].items()]

    def applies(self, attack: str, defense: str) -> bool:
        return (self.defenses is None or defense in self.defenses) and (self.attacks is None or attack in self.attacks)


class Exclude(_Strict):
    """Leave out the cells of an (attack label, defense label) pair; either side alone matches all of the other."""

    attack: str | None = None
    defense: str | None = None
    reason: str = ""

    def matches(self, attack: str, defense: str) -> bool:
        return (self.attack is None or self.attack == attack) and (self.defense is None or self.defense == defense)


class Resources(_Strict):
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per cell; also the cell's torch threads")
    num_gpus: float = Field(0.0, ge=0)


class RaySpec(_Strict):
    address: str | None = Field(None, description="null: start a local Ray; 'auto' or 'ray://host:10001'")
    init_args: dict[str, Any] = Field(default_factory=dict, description="forwarded to ray.init")


class Grid(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    base: dict[str, Any]
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted scenario path -> value, every cell")
    attacks: list[AttackEntry] = Field(min_length=1)
    defenses: list[DefenseEntry] = Field(default_factory=lambda: [DefenseEntry(label="base", defenses=None)],
                                         min_length=1)
    sweep: dict[str, SweepAxis] = Field(default_factory=dict)
    exclude: list[Exclude] = Field(default_factory=list, description="pairs not to run (e.g. incompatible)")
    design: Literal["product", "one_at_a_time"] = Field(
        "product", description="one_at_a_time: the centre (every axis's first value) plus one axis changed at a time")
    repeats: int = Field(1, ge=1)
    resources: Resources = Resources()
    ray: RaySpec = RaySpec()
    max_parallel: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:  # the default bench directory is runs/bench-NAME
        return path_component(value)

    @model_validator(mode="after")
    def _check(self) -> Grid:
        _check_paths(self.overrides, "overrides")
        _check_paths({k: v for k, v in self.sweep.items() if v.bundles is None}, "sweep")
        for key, axis in self.sweep.items():
            if axis.bundles is None:
                continue
            if "." in key or key.split("[")[0] in FORBIDDEN_PATHS:
                raise _PathError(f"sweep.{key}", "a bundles axis is named by a plain word (its bundles hold the paths)")
            for k, value in enumerate(axis.values):
                if value not in axis.bundles:
                    raise _PathError(f"sweep.{key}.values[{k}]", f"no bundle {value!r} (bundles: "
                                                                 f"{', '.join(axis.bundles)})")
            for label, paths in axis.bundles.items():
                if not paths:
                    raise _PathError(f"sweep.{key}.bundles.{label}", "an empty bundle sets nothing")
                _check_paths(paths, f"sweep.{key}.bundles.{label}")
        base_attacks = self.base.get("attacks") or []
        labels: list[str] = []
        for i, entry in enumerate(self.attacks):
            _check_paths(entry.overrides, f"attacks[{i}].overrides")
            if entry.spec is None and not base_attacks:
                raise _PathError(f"attacks[{i}]", "no attack spec, and the base scenario has no attack to take")
            if entry.spec is not None and not isinstance(entry.spec.get("name"), str):
                raise _PathError(f"attacks[{i}].name", "an attack spec needs a name")
            label = self.attack_label(i)
            if label in labels:
                raise _PathError(f"attacks[{i}].label", f"duplicate attack label {label!r} (give each entry a label)")
            labels.append(label)
        defense_labels = [d.label for d in self.defenses]
        for j, entry in enumerate(self.defenses):
            _check_paths(entry.overrides, f"defenses[{j}].overrides")
            if entry.label in defense_labels[:j]:
                raise _PathError(f"defenses[{j}].label", f"duplicate defense label {entry.label!r}")
        for key, axis in self.sweep.items():
            for kind, scope, known in (("defenses", axis.defenses, defense_labels), ("attacks", axis.attacks, labels)):
                for k, label in enumerate(scope or []):
                    if label not in known:
                        raise _PathError(f"sweep.{key}.{kind}[{k}]",
                                         f"unknown {kind[:-1]} label {label!r} (labels: {', '.join(known)})")
        for k, rule in enumerate(self.exclude):
            if rule.attack is None and rule.defense is None:
                raise _PathError(f"exclude[{k}]", "name an attack label, a defense label or both")
            for kind, label, known in (("attack", rule.attack, labels), ("defense", rule.defense, defense_labels)):
                if label is not None and label not in known:
                    raise _PathError(f"exclude[{k}].{kind}",
                                     f"unknown {kind} label {label!r} (labels: {', '.join(known)})")
        return self

    def attack_label(self, index: int) -> str:
        entry = self.attacks[index]
        if entry.label:
            return entry.label
        if entry.spec is not None:
            return str(entry.spec["name"])
        return str(self.base["attacks"][0]["name"])


def parse_grid(raw: Any) -> Grid:
    """Validate a raw grid mapping whose ``base`` is already a mapping."""
    if not isinstance(raw, dict):
        raise ScenarioError("", "a grid must be a YAML mapping")
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None


def _read_yaml(path: Path, field: str) -> Any:
    return read_yaml(path, "file", field)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read a grid file, inline its ``base`` scenario file, apply ``--set`` overrides, validate."""
    path = Path(path)
    raw = _read_yaml(path, "")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError("", f"{path} must hold a YAML mapping (a grid)")
    scenario_keys = [k for k in ("data", "model", "federation", "backend") if k in raw]
    if "base" not in raw and scenario_keys:  # a grid holds these only inside base:
        raise ScenarioError("", f"{path} is a scenario (top-level {', '.join(scenario_keys)}), not a bench grid "
                                "(base:, attacks:, defenses:, sweep:): run it with `fedsim run`")
    raw = copy.deepcopy(raw)
    raw.setdefault("name", path.stem)
    base = raw.get("base")
    if isinstance(base, str):
        loaded = _read_yaml((path.parent / base), "base")
        if not isinstance(loaded, dict):
            raise ScenarioError("base", f"{base!r} does not hold a scenario mapping")
        raw["base"] = loaded
    elif base is not None and not isinstance(base, dict):
        raise ScenarioError("base", "must be a scenario file path or an inline scenario mapping")
    return parse_grid(apply_overrides(raw, list(overrides or [])))
