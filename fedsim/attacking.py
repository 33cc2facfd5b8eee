"""Run the scenario's attacks on the captured updates, then score them against the ground truth.

This is the only place where both halves of the contract meet, and they never cross: each attack
gets a :class:`ClientUpdate` view built from what the server observed plus exactly the knowledge
its threat model grants (e.g. labels copied in only when ``knowledge.labels: known``); the
:class:`GroundTruth` goes to ``fedsim.metrics`` alone, after the attack has returned.

Model-inversion attacks (``target = "model"``) instead get a :class:`ReleasedModel` of the global
model released after each attacked round (default: the final one), once per round, recorded as
partition :data:`RELEASED_MODEL_ID`, and are scored by ``fedsim.metrics.model_inversion`` (an
independent evaluation classifier) instead of against a client's batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch

from fedsim.attack_tasks import AttackExecutor, AttackJob, ProgressFactory, SerialExecutor, run_all, task_threads
from fedsim.attack_verdict import (  # noqa: F401  (public here too: the runner's verdict and its outcome)
    LABEL_METRICS,
    AttackOutcome,
    input_grants,
    judge,
    oracle_grants,
)
from fedsim.errors import FedsimError
from fedsim.metrics import score_reconstruction
from fedsim.metrics.evaluator import load_evaluator
from fedsim.metrics.model_inversion import score_model_inversion
from fedsim.metrics.text import dataset_public_ranking
from fedsim.outcomes import NOT_ATTACKED
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import derive_seed, seed_torch
from fedsim.simulation.capture import AGGREGATE_ID, RELEASED_MODEL_ID, CapturedUpdate
from fedsim.simulation.federation import attacks_model, released_rounds
from fedsim.simulation.setup import setup_for
from fedsim.threat import ClientUpdate, Reconstruction, ReleasedModel, TaskInfo, frozen_tensors
from fedsim.threat_models import exercised_letter, needed_letter


def observe(captured: CapturedUpdate, task: TaskInfo, scenario: Scenario, spec: AttackSpec,
            defense_descriptions: Sequence[dict[str, Any]]) -> ClientUpdate:
    """The attacker's view of one captured update under ``spec``'s declared knowledge: the one place a
    view is built. Each field beyond the observed update is filled only by the flag that grants it (see
    the table in :mod:`fedsim.threat`); ``task`` carries architecture only (``TaskInfo.model_transforms``
    holds no defense parameter a model rebuild does not need)."""
    knowledge = spec.knowledge
    local = scenario.federation.local
    hyperparams: dict[str, Any] = {}
    if knowledge.local_hparams:
        hyperparams = {**local.model_dump(), "protocol": scenario.federation.protocol}
    side_info: dict[str, Any] = {}
    if knowledge.labels == "known":
        side_info["labels"] = captured.truth.labels.clone()
    if knowledge.oracle_masks:
        # The declared exception to "no ground truth reaches an attack": oracle upper bounds (dia_oracle,
        # the DIA paper's WIIG) get the client's true dropout masks, keyed as recorded ("mask/<layer
        # name>"), only when the scenario sets knowledge.oracle_masks; the runner then labels the
        # outcome oracle (oracle_grants), whatever the attack does with them.
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
        reference_state=frozen_tensors(captured.reference_state),  # DIFF2 differences: x_(r-1), sent by the server
        staleness=captured.staleness,  # the lag of the model the server sent this client (it chose it)
        architecture=tuple(captured.architecture),  # what a malicious server shipped with global_state (it chose it)
        hyperparams=MappingProxyType(hyperparams),
        side_info=MappingProxyType(side_info),
        defenses=tuple(defense_descriptions) if knowledge.defense else (),
    )


def not_attacked(scenario: Scenario, spec: AttackSpec, captured: Sequence[CapturedUpdate],
                 failed_clients: Mapping[tuple[int, int], str] | None) -> dict[tuple[int, int], str]:
    """{(round, partition id): why it was not attacked} for each targeted (round, client) with no captured update
    (nor a SecAgg aggregate in its stead): the client failed (its reason), or was not sampled in that round.

    With ``clients: all`` only failures count (the attack targets whichever clients were sampled); clients the
    scenario NAMES are each reported, so an attack never goes silently unrun."""
    fed = scenario.federation
    rounds = spec.target_rounds(fed.rounds)
    failed = failed_clients or {}
    seen = {(c.round, c.partition_id) for c in captured}
    if spec.clients == "all":
        keys = [k for k in failed if k[0] in rounds]
    else:
        keys = [(r, c) for r in rounds for c in spec.target_clients(fed.clients)]
    out: dict[tuple[int, int], str] = {}
    for rnd, client in sorted(set(keys)):
        if (rnd, client) in seen or (rnd, AGGREGATE_ID) in seen:
            continue
        if (rnd, client) in failed:
            out[(rnd, client)] = f"client {client} failed in round {rnd}: {failed[(rnd, client)]}"
        else:
            out[(rnd, client)] = NOT_ATTACKED + (  # counted as not attacked (fedsim.outcomes), not as a failure
                f"client {client} was not sampled in round {rnd} (federation.clients_per_round "
                f"{fed.sampled_per_round} of {fed.clients})" if fed.sampled_per_round < fed.clients else
                f"client {client} sent no update in round {rnd}")
    return out


@dataclass
class _Planned:
    """One outcome of the run, in order: its job (None when nothing is to run) and what the driver scores it with.

    ``captured`` (update attacks) holds the ground truth and never leaves the driver; ``state`` is the released
    model a model-inversion outcome is scored on; ``preset`` a failure known without running (an empty batch, a
    model not kept); ``lost`` why a targeted (round, client) has no update at all."""

    index: int
    spec: AttackSpec
    round: int
    partition_id: int
    job: AttackJob | None = None
    preset: Reconstruction | None = None
    captured: CapturedUpdate | None = None
    state: Mapping[str, torch.Tensor] | None = None
    lost: str | None = None


def plan_attacks(scenario: Scenario, captured: Sequence[CapturedUpdate], task: TaskInfo, device: torch.device,
                 defense_descriptions: Sequence[dict[str, Any]] = (),
                 released: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                 failed_clients: Mapping[tuple[int, int], str] | None = None) -> list[_Planned]:
    """Every outcome of the run in output order (scenario order, then round and client; model inversion once per
    released round), each with the job that produces it. Seeds come from (attack index, round, client) alone."""
    fed = scenario.federation
    threads = torch.get_num_threads()
    plan: list[_Planned] = []

    def job(spec: AttackSpec, view: ClientUpdate | ReleasedModel, seed: int, label: str, total: int) -> AttackJob:
        return AttackJob(len(plan), spec, view, seed, device, task_threads(spec.resources.num_cpus, threads),
                         label, total)

    for index, spec in enumerate(scenario.attacks):
        if attacks_model(spec):
            for rnd in released_rounds(spec, fed.rounds):
                state = (released or {}).get(rnd)
                entry = _Planned(index, spec, rnd, RELEASED_MODEL_ID, state=state)
                if state is None:
                    entry.preset = Reconstruction.failure(f"the global model after round {rnd} was not kept")
                else:  # candidates run as one batch: progress counts iterations
                    entry.job = job(spec, ReleasedModel(rnd, task, frozen_tensors(state)),
                                    derive_seed(scenario.seed, "attack", index, rnd, RELEASED_MODEL_ID),
                                    f"{spec.name} r{rnd} released model", spec.budget.iterations)
                plan.append(entry)
            continue
        rounds = set(spec.target_rounds(fed.rounds))
        clients = set(spec.target_clients(fed.clients))
        targets = [c for c in captured if c.round in rounds
                   and (c.partition_id in clients or c.partition_id == AGGREGATE_ID)]
        lost = not_attacked(scenario, spec, captured, failed_clients)
        for cap in sorted([*targets, *lost], key=lambda c: c if isinstance(c, tuple) else (c.round, c.partition_id)):
            if isinstance(cap, tuple):  # no update to attack: the client failed, or was not sampled, in that round
                plan.append(_Planned(index, spec, cap[0], cap[1], lost=lost[cap]))
                continue
            entry = _Planned(index, spec, cap.round, cap.partition_id, captured=cap)
            if len(cap.truth.inputs) == 0:  # e.g. a DP-SGD client whose Poisson batch was empty
                entry.preset = Reconstruction.failure("the client used no examples in this update")
            else:
                entry.job = job(spec, observe(cap, task, scenario, spec, defense_descriptions),
                                derive_seed(scenario.seed, "attack", index, cap.round, cap.partition_id),
                                f"{spec.name} r{cap.round} c{cap.partition_id}",
                                spec.budget.iterations * spec.budget.restarts)
            plan.append(entry)
    return plan


def _score_model(scenario: Scenario, entry: _Planned, rec: Reconstruction, seconds: float,
                 device: torch.device) -> AttackOutcome:
    """A model-inversion outcome, scored by an independent evaluation classifier
    (:func:`fedsim.metrics.model_inversion.score_model_inversion`)."""
    index, rnd, state = entry.index, entry.round, entry.state
    stats = dict(rec.stats)
    metrics: dict[str, Any] = {"failed": rec.failed} if rec.failed else {}
    if state is not None and not rec.failed:
        try:
            evaluator = load_evaluator(scenario.data, device)
            target = setup_for(scenario).build_model()
            target.load_state_dict(dict(state))
            target.to(device).eval()
            with torch.random.fork_rng(devices=[]):  # the released model may be stochastic (MID)
                seed_torch(derive_seed(scenario.seed, "mi-score", index, rnd))
                metrics = score_model_inversion(rec, evaluator, target)
            stats.update(evaluator_accuracy=evaluator.accuracy, evaluator_val_size=float(evaluator.num_val))
        except (FedsimError, ValueError, RuntimeError, OSError) as err:  # e.g. no usable test split, disk errors
            metrics = {"failed": f"model-inversion scoring failed: {err}"}
    oracle, reasons, given, metrics = judge(metrics)  # a released model carries no ground truth
    return AttackOutcome(
        attack=entry.spec.name, attack_index=index, round=rnd, partition_id=RELEASED_MODEL_ID, metrics=metrics,
        stats=stats, seconds=seconds, failed=rec.failed, oracle=oracle, oracle_reasons=reasons, oracle_labels=given,
        reconstruction=rec.images, truth=None, labels=rec.labels,
    )


def _score_update(scenario: Scenario, entry: _Planned, rec: Reconstruction, seconds: float, task: TaskInfo,
                  defense_descriptions: Sequence[dict[str, Any]]) -> AttackOutcome:
    """An update attack's outcome, scored against the captured ground truth here in the driver."""
    cap, spec, index = entry.captured, entry.spec, entry.index
    assert cap is not None
    view = entry.job.view if entry.job is not None else observe(cap, task, scenario, spec, defense_descriptions)
    assert isinstance(view, ClientUpdate)
    grants = (*oracle_grants(spec.knowledge), *input_grants(view, cap.truth.inputs))
    public = dataset_public_ranking(scenario.data, cap.truth.inputs.shape[1]) if task.is_text else None
    oracle, reasons, given, metrics = judge(score_reconstruction(rec, cap.truth, public_tokens=public), grants,
                                            labels_given="labels" in view.side_info,
                                            asked=view.examples_to_reconstruct)
    text = task.is_text
    return AttackOutcome(
        attack=spec.name, attack_index=index, round=cap.round, partition_id=cap.partition_id,
        metrics=metrics, stats=dict(rec.stats), seconds=seconds, failed=rec.failed, oracle=oracle,
        oracle_reasons=reasons, oracle_labels=given, reconstruction=rec.images,
        truth=None if text else cap.truth.inputs, labels=rec.labels, staleness=cap.staleness,
        manipulated_by=_manipulator(scenario, index, cap), tokens=_ids(rec.tokens),
        truth_tokens=_ids(cap.truth.inputs) if text else None, token_set=_ids(rec.token_set),
    )


def run_attacks(
    scenario: Scenario,
    captured: Sequence[CapturedUpdate],
    task: TaskInfo,
    device: torch.device,
    defense_descriptions: Sequence[dict[str, Any]] = (),
    progress: ProgressFactory | None = None,
    released: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    failed_clients: Mapping[tuple[int, int], str] | None = None,
    executor: AttackExecutor | None = None,
) -> list[AttackOutcome]:
    """Every (attack, targeted update) pair, in scenario order, then by round and client; model-inversion
    attacks once per attacked round on ``released`` (round -> global state after it). A targeted client
    that failed in that round (``failed_clients``: (round, partition id) -> reason) gets a failed outcome.

    The attacks run on ``executor`` (default :class:`~fedsim.attack_tasks.SerialExecutor`; ``attack_execution.mode:
    ray``: :class:`~fedsim.attack_ray.RayExecutor`), which sees only the attacks' views; every outcome is then
    scored here, in output order, whatever order the jobs finished in."""
    plan = plan_attacks(scenario, captured, task, device, defense_descriptions, released, failed_clients)
    results = run_all([e.job for e in plan if e.job is not None], executor or SerialExecutor(), progress)
    outcomes: list[AttackOutcome] = []
    for entry in plan:
        if entry.lost is not None:
            outcomes.append(AttackOutcome(attack=entry.spec.name, attack_index=entry.index, round=entry.round,
                                          partition_id=entry.partition_id, metrics={}, stats={}, seconds=0.0,
                                          failed=entry.lost))
            continue
        done = results[entry.job.key] if entry.job is not None else None
        rec = done.reconstruction if done is not None else entry.preset
        seconds = done.seconds if done is not None else 0.0
        assert rec is not None
        if entry.captured is None:
            outcomes.append(_score_model(scenario, entry, rec, seconds, device))
        else:
            outcomes.append(_score_update(scenario, entry, rec, seconds, task, defense_descriptions))
    return [_filed(scenario, o) for o in outcomes]



def _ids(value: torch.Tensor | None) -> torch.Tensor | None:
    """Token ids as a detached int64 CPU copy (None stays None; a malformed value is kept as the attack gave it)."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point():
        return value
    return value.detach().to("cpu", torch.int64).clone()


def _manipulator(scenario: Scenario, index: int, captured: CapturedUpdate) -> tuple[int, str] | None:
    """``(i, name)`` of attacks[i] when the update attack ``index`` reads answers a model that ANOTHER attack of the
    scenario manipulated (``captured.manipulated_by``, set by the malicious server's path: the targeted client, every
    client under ``to_all``, the SecAgg+ aggregate); None otherwise (the honest model, or the attack's own)."""
    by = captured.manipulated_by
    if by is None or by == index:
        return None
    return by, scenario.attacks[by].name


def _filed(scenario: Scenario, outcome: AttackOutcome) -> AttackOutcome:
    """The outcome with the SoK letter it exercised: the attack's own (:func:`needed_letter`), raised to include the
    manipulator's (:func:`exercised_letter`) when it attacked a manipulated model. The runner decides this, never
    the attack: an honest attack reading a fished or imprinted update leaks what an F/G server would."""
    letter = needed_letter(scenario.attacks[outcome.attack_index])
    if outcome.manipulated_by is not None:
        letter = exercised_letter(letter, needed_letter(scenario.attacks[outcome.manipulated_by[0]]))
    return replace(outcome, threat_model=letter)
