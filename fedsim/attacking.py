"""Run the scenario's attacks on the captured updates, then score them against the ground truth.

This is the only place where both halves of the contract meet, and they never cross: each attack
gets a :class:`ClientUpdate` view built from what the server observed plus exactly the knowledge
its threat model grants (e.g. labels copied in only when ``knowledge.labels: known``); the
:class:`GroundTruth` goes to ``fedsim.metrics`` alone, after the attack has returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from fedsim.metrics import score_reconstruction
from fedsim.plugins import attack_registry
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import derive_seed
from fedsim.simulation.capture import AGGREGATE_ID, CapturedUpdate
from fedsim.threat import ClientUpdate, Reconstruction, TaskInfo, frozen_tensors

ProgressFactory = Callable[[str, int], Callable[[int, int], None]]  # (label, total) -> progress fn


@dataclass
class AttackOutcome:
    """One attack on one captured update: its scores, its stats and (for pictures) the images."""

    attack: str
    attack_index: int
    round: int
    partition_id: int
    metrics: dict[str, Any]
    stats: dict[str, float]
    seconds: float
    failed: str | None = None
    oracle: bool = False
    reconstruction: torch.Tensor | None = field(default=None, repr=False)
    truth: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "attack_index": self.attack_index, "round": self.round,
            "client": self.partition_id, "seconds": round(self.seconds, 3), "failed": self.failed,
            "oracle": self.oracle, "metrics": self.metrics, "stats": self.stats,
        }


def observe(captured: CapturedUpdate, task: TaskInfo, scenario: Scenario, spec: AttackSpec,
            defense_descriptions: Sequence[dict[str, Any]]) -> ClientUpdate:
    """The attacker's view of one captured update under ``spec``'s declared knowledge."""
    knowledge = spec.knowledge
    local = scenario.federation.local
    hyperparams: dict[str, Any] = {}
    if knowledge.local_hparams:
        hyperparams = {**local.model_dump(), "protocol": scenario.federation.protocol}
    side_info: dict[str, Any] = {}
    if knowledge.labels == "known":
        side_info["labels"] = captured.truth.labels.clone()
    if knowledge.oracle_masks:
        # The single, declared exception to "no ground truth reaches an attack": oracle upper bounds
        # (dia_oracle, the DIA paper's WIIG) get the client's true dropout masks, keyed as recorded
        # ("mask/<layer name>"), only when the scenario sets knowledge.oracle_masks; they must return
        # Reconstruction(oracle=True), so every report labels their output as an oracle.
        side_info["oracle_masks"] = MappingProxyType({
            k: v.clone() for k, v in captured.truth.extras.items() if k.startswith("mask/")
        })
    return ClientUpdate(
        round=captured.round,
        partition_id=captured.partition_id,
        task=task,
        global_state=frozen_tensors(captured.global_state),
        update=frozen_tensors(captured.update),
        num_examples=captured.num_examples,
        hyperparams=MappingProxyType(hyperparams),
        side_info=MappingProxyType(side_info),
        defenses=tuple(defense_descriptions) if knowledge.defense else (),
    )


def _reconstruct(attack: Any, view: ClientUpdate, progress: Any, seed: int) -> Reconstruction:
    """Run one attack with the global torch RNG forked and seeded, so draws inside the model (e.g. MID's
    stochastic bottleneck) are reproducible and identical on every backend."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return attack.reconstruct(view, progress)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the run
            return Reconstruction.failure(f"{type(exc).__name__}: {exc}")


def run_attacks(
    scenario: Scenario,
    captured: Sequence[CapturedUpdate],
    task: TaskInfo,
    device: torch.device,
    defense_descriptions: Sequence[dict[str, Any]] = (),
    progress: ProgressFactory | None = None,
) -> list[AttackOutcome]:
    """Every (attack, targeted update) pair, in scenario order, then by round and client."""
    registry = attack_registry()
    fed = scenario.federation
    outcomes: list[AttackOutcome] = []
    for index, spec in enumerate(scenario.attacks):
        rounds = set(spec.target_rounds(fed.rounds))
        clients = set(spec.target_clients(fed.clients))
        targets = sorted((c for c in captured if c.round in rounds
                          and (c.partition_id in clients or c.partition_id == AGGREGATE_ID)),
                         key=lambda c: (c.round, c.partition_id))
        cls = registry.get(spec.name)
        for cap in targets:
            seed = derive_seed(scenario.seed, "attack", index, cap.round, cap.partition_id)
            attack = cls.from_spec(spec, device, seed)
            view = observe(cap, task, scenario, spec, defense_descriptions)
            label = f"{spec.name} r{cap.round} c{cap.partition_id}"
            fn = progress(label, spec.budget.iterations * spec.budget.restarts) if progress else None
            start = time.perf_counter()
            if len(cap.truth.inputs) == 0:  # e.g. a DP-SGD client whose Poisson batch was empty
                rec = Reconstruction.failure("the client used no examples in this update")
            else:
                rec = _reconstruct(attack, view, fn, seed)
            seconds = time.perf_counter() - start
            outcomes.append(AttackOutcome(
                attack=spec.name, attack_index=index, round=cap.round, partition_id=cap.partition_id,
                metrics=score_reconstruction(rec, cap.truth), stats=dict(rec.stats), seconds=seconds, failed=rec.failed,
                oracle=rec.oracle, reconstruction=rec.images, truth=cap.truth.inputs,
            ))
    return outcomes
