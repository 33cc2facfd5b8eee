"""A comparison varies only what it studies: the rule, and every comparison fedsim ships.

A comparison is a few fully resolved configurations (every default filled in, attack parameters
included: a default that differs between two attacks is as much a difference as a written one)
plus the dotted paths it *studies*. Anything else that differs must be *stated*: a method's own
choice, with the reason, which the comparison's text repeats. :meth:`Comparison.unexplained` lists
what differs and is neither; ``tests/test_comparisons.py`` requires it to be empty for every
comparison :func:`shipped_comparisons` finds (scenarios that run several attacks on one update, the
dropout figure's sweep and the bench grids' defense rows); the test also checks the MID sweep's rows
(``benchmarks/mid_sweep.row_scenario``).

Attack parameters that only one of two attacks has are its method (IG's step decay, DIA's mask
prior) and are not compared; a parameter both have (``tv``, ``lr``, ``init``, ``label_strategy``)
is, as are knowledge, budget, rounds and clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.scenario import Scenario, load_scenario
from fedsim.teaching.dia_figure import PS, sweep_scenarios
from fedsim.teaching.resolve import resolved_attack, resolved_scenario

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Study:
    """What a multi-attack scenario compares (``studied`` paths) and what else differs on purpose."""

    studied: tuple[str, ...] = ("name",)
    stated: Mapping[str, str] = field(default_factory=dict)  # path prefix -> why it may differ


# Every shipped scenario that runs more than one attack on the same updates, and what it studies.
# A new multi-attack scenario must be added here (the test refuses an undeclared one).
ATTACK_STUDIES: dict[str, Study] = {
    "scenarios/tutorial/02_batches_and_labels.yaml": Study(("params.label_strategy",)),
    "scenarios/tutorial/03_fedavg_local_steps.yaml": Study(("name", "knowledge.local_hparams")),
    "scenarios/tutorial/05_dropout_is_not_a_defense.yaml": Study(("name", "knowledge.oracle_masks")),
    "scenarios/attacks/fedavg_inversion.yaml": Study(("name", "knowledge.local_hparams")),
    # leakage over the rounds of a real training run: FedAvg inversion (replays the granted local recipe) beside IG
    "scenarios/tutorial/12_real_training.yaml": Study(("name", "knowledge.local_hparams")),
    "scenarios/protocols/leakage_over_rounds.yaml": Study(("name", "knowledge.local_hparams")),
    "scenarios/attacks/gradinversion.yaml": Study(
        ("name", "knowledge.bn_stats"),
        {"params.lr": "GradInversion steps unsigned Adam, IG signed Adam: the step sizes are different quantities"},
    ),
    "scenarios/attacks/gan_prior_comparison.yaml": Study(
        ("name",),
        {"params.tv": "each method's own TV weight: free pixels need a stronger image prior than a generator's range",
         "params.lr": "Adam on pixels (IG, signed) vs on a latent or feature (GAN attacks): different quantities"},
    ),
    "scenarios/attacks/model_inversion.yaml": Study(("name",)),
    # text: the bag of tokens (token_set) beside the exact sequences (dager) from the same gradient
    "scenarios/text/quickstart.yaml": Study(("name",)),
    "scenarios/text/dp_sgd.yaml": Study(("name",)),
    "scenarios/text/bert_classifier.yaml": Study(("name",)),
    "scenarios/tutorial/13_your_keyboards_gradient.yaml": Study(("name",)),
}

DROPOUT_FIGURE = ROOT / "scenarios" / "tutorial" / "05_dropout_is_not_a_defense.yaml"
GRIDS = ("benchmarks/grids/fast.yaml", "benchmarks/grids/full.yaml", "benchmarks/grids/malicious.yaml")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _covered(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Comparison:
    """Configurations (label -> flat resolved mapping) compared against the first one.

    ``method_params``: the configurations are different attacks, so a ``params.*`` key only one of
    them has is that method's own and is not compared.
    """

    name: str
    source: str
    configs: Mapping[str, Mapping[str, Any]]
    studied: tuple[str, ...]
    stated: Mapping[str, str] = field(default_factory=dict)
    method_params: bool = False

    def differences(self, label: str) -> set[str]:
        """Paths where configuration ``label`` differs from the first configuration."""
        base = next(iter(self.configs.values()))
        other = self.configs[label]
        out = set()
        for path in set(base) | set(other):
            if self.method_params and path.startswith("params.") and (path not in base or path not in other):
                continue
            if base.get(path, _MISSING) != other.get(path, _MISSING):
                out.add(path)
        return out

    def unexplained(self) -> dict[str, list[str]]:
        """Per configuration, what differs from the first and is neither studied nor stated."""
        allowed = (*self.studied, *self.stated)
        out = {}
        for label in list(self.configs)[1:]:
            extra = sorted(p for p in self.differences(label) if not _covered(p, allowed))
            if extra:
                out[label] = extra
        return out


_MISSING = object()


def attack_comparison(path: Path, study: Study) -> Comparison:
    """The attacks of one scenario file, compared with each other."""
    scenario = load_scenario(path)
    configs = {f"attacks[{i}] {a.name}": resolved_attack(a) for i, a in enumerate(scenario.attacks)}
    return Comparison(f"attacks of {path.name}", _rel(path), configs, study.studied, study.stated, method_params=True)


def multi_attack_scenarios() -> list[Path]:
    """Every shipped scenario file with more than one attack."""
    files = sorted((ROOT / "scenarios").rglob("*.yaml"))
    return [f for f in files if "priors" not in f.parts and len(load_scenario(f).attacks) > 1]


def dropout_figure_comparisons(ps: Iterable[float] | None = None, iterations: int | None = None) -> list[Comparison]:
    """The dropout figure's configurations: across p only ``model.dropout`` changes, and its attacks
    (in one column) differ only as its scenario's study says."""
    scenarios = sweep_scenarios(DROPOUT_FIGURE, PS if ps is None else tuple(ps), iterations)
    source = str(DROPOUT_FIGURE.relative_to(ROOT))
    across = Comparison("dropout figure: columns", source,
                        {f"p={p:g}": resolved_scenario(s) for p, s in scenarios}, ("model.dropout",))
    study = ATTACK_STUDIES[source]
    within = [Comparison(f"dropout figure: rows at p={p:g}", source,
                         {f"attacks[{i}] {a.name}": resolved_attack(a) for i, a in enumerate(s.attacks)},
                         study.studied, study.stated, method_params=True) for p, s in scenarios]
    return [across, *within]


def grid_comparisons(path: Path) -> list[Comparison]:
    """A bench grid's rows: for each attack (and repeat and non-defense sweep point), every defense
    cell against a cell without defenses. A defense entry that also changes the federation
    (``central_dp`` needs FedAvg) needs a defense-free entry with the same change to be compared with;
    when several exist, the closest one is its baseline."""
    from fedsim.bench.expand import expand_grid
    from fedsim.bench.grid import load_grid

    cells = expand_grid(load_grid(path))
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for cell in cells:
        rest = tuple(sorted((k, str(v)) for k, v in cell.params.items() if not k.startswith("defenses.")))
        groups.setdefault((cell.attack, cell.repeat, rest), []).append(cell)
    out = []
    for (attack, repeat, rest), members in groups.items():
        flat = {c.cell_id: resolved_scenario(Scenario.model_validate(c.scenario)) for c in members}
        bases = [c for c in members if not c.scenario.get("defenses")]
        for cell in members:
            if not cell.scenario.get("defenses"):
                continue
            options = [Comparison(f"{path.name}: {attack} x {cell.defense} vs {base.defense}, repeat {repeat} {rest}",
                                  _rel(path), {base.defense: flat[base.cell_id],
                                                                cell.defense: flat[cell.cell_id]}, ("defenses",))
                       for base in bases]
            if not options:
                options = [Comparison(f"{path.name}: {attack} x {cell.defense}: no defense-free cell to compare with",
                                      _rel(path), {"none": {}, cell.defense: {"missing": True}}, ())]
            out.append(min(options, key=lambda c: sum(len(v) for v in c.unexplained().values())))
    return out


def shipped_comparisons() -> list[Comparison]:
    """Every comparison fedsim ships that can be checked from its configuration."""
    out = []
    for path in multi_attack_scenarios():
        rel = _rel(path)
        out.append(attack_comparison(path, ATTACK_STUDIES.get(rel, Study(("<undeclared: add to ATTACK_STUDIES>",)))))
    out += dropout_figure_comparisons()
    for grid in GRIDS:
        out += grid_comparisons(ROOT / grid)
    return out
