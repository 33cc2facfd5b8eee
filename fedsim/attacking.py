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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from fedsim.errors import FedsimError
from fedsim.metrics import score_reconstruction
from fedsim.metrics.evaluator import load_evaluator
from fedsim.metrics.model_inversion import score_model_inversion
from fedsim.metrics.text import dataset_public_ranking
from fedsim.outcomes import NOT_ATTACKED
from fedsim.plugins import attack_registry
from fedsim.scenario import AttackSpec, Knowledge, Scenario
from fedsim.seeding import derive_seed
from fedsim.simulation.capture import AGGREGATE_ID, RELEASED_MODEL_ID, CapturedUpdate
from fedsim.simulation.federation import attacks_model, released_rounds
from fedsim.simulation.setup import setup_for
from fedsim.threat import ClientUpdate, Reconstruction, ReleasedModel, TaskInfo, frozen_tensors
from fedsim.threat_models import exercised_letter, needed_letter

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
    oracle: bool = False  # the runner handed ground truth, or the scorer chose among candidates with it
    oracle_reasons: tuple[str, ...] = ()  # which: "dropout masks", "selection: ..."
    oracle_labels: bool = False  # the runner handed the true labels (knowledge.labels: known)
    staleness: int = 0  # rounds the model the attacked client trained from lagged (federation.staleness; 0: fresh)
    # the SoK letter exercised: the one the attack needed with its params and knowledge (fedsim.threat_models), or,
    # on an update answering a model another attack manipulated, that together with the manipulator's letter
    threat_model: str = ""
    # (index, name) of the malicious attack that built the model this update answers, when not this attack; None
    manipulated_by: tuple[int, str] | None = None
    reconstruction: torch.Tensor | None = field(default=None, repr=False)
    truth: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)  # the attack's labels (MI: target classes)
    # Text attacks (the report shows recovered sentences beside the originals; decode with
    # fedsim.text.tokenizer.decode(task.tokenizer, ids)): ``tokens`` the recovered sequences, int64 (K, T), -1 where
    # unfilled, in the attack's order (metrics["order"][i] is the row matched to true sequence i, -1: none);
    # ``truth_tokens`` the client's true token ids, int64 (B, T); ``token_set`` the recovered distinct ids (M,) of a
    # bag-only attack. ``reconstruction`` and ``truth`` (images) stay None for text.
    tokens: torch.Tensor | None = field(default=None, repr=False)
    truth_tokens: torch.Tensor | None = field(default=None, repr=False)
    token_set: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "attack_index": self.attack_index, "round": self.round,
            "client": self.partition_id, "seconds": round(self.seconds, 3), "failed": self.failed,
            "oracle": self.oracle, "oracle_reasons": list(self.oracle_reasons), "oracle_labels": self.oracle_labels,
            "metrics": self.metrics, "stats": self.stats, "staleness": self.staleness,
            "threat_model": self.threat_model,
            **({} if self.manipulated_by is None else  # absent: the honest model (and in files before it existed)
               {"manipulated_by": {"attack_index": self.manipulated_by[0], "attack": self.manipulated_by[1]}}),
        }


LABEL_METRICS = ("label_acc", "label_acc_matched")


def oracle_grants(knowledge: Knowledge) -> tuple[str, ...]:
    """The ground truth :func:`observe` hands an attack under ``knowledge``, beyond the true labels
    (recorded apart, as ``oracle_labels``): any of it makes the outcome an oracle upper bound."""
    return ("dropout masks",) if knowledge.oracle_masks else ()


def input_grants(view: ClientUpdate, inputs: torch.Tensor) -> tuple[str, ...]:
    """The granted parts of ``view`` (``side_info``, ``hyperparams``, ``defenses``, searched through nested mappings
    and sequences) that hold the client's ground-truth ``inputs`` (images (B, C, H, W), token ids (B, T), ...): a
    tensor equal to them element for element (any shape or dtype), or, for token ids, to their next-token targets
    or contexts (``inputs[:, 1:]``, ``inputs[:, :-1]``). One reason per such grant, e.g. ``side_info["labels"] holds
    the client's inputs``; the runner passes them to :func:`judge` with :func:`oracle_grants`, so the outcome is an
    oracle whatever the attack did with them. The second line of defence behind validation (which refuses
    ``knowledge.labels: known`` on a language model, whose labels are its input text): a task kind added later whose
    grants carry the inputs is labelled, never silently scored as an honest attack."""
    if inputs.numel() == 0:
        return ()
    ref = inputs.detach().to("cpu")
    forms = [ref]
    if not ref.is_floating_point() and ref.dim() == 2 and ref.shape[1] > 1:
        forms += [ref[:, 1:], ref[:, :-1]]
    flat = [f.reshape(-1).double() for f in forms]

    def holds(value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        v = value.detach().to("cpu").reshape(-1)
        return any(v.numel() == f.numel() and torch.equal(v.double(), f) for f in flat)

    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if holds(value):
            found.append(f"{where} holds the client's inputs")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(view.side_info, "side_info")
    walk(view.hyperparams, "hyperparams")
    walk(view.defenses, "defenses")
    return tuple(found)


def judge(metrics: dict[str, Any], grants: Sequence[str] = (), labels_given: bool = False,
          asked: int | None = None) -> tuple[bool, tuple[str, ...], bool, dict[str, Any]]:
    """The runner's verdict on one outcome: ``(oracle, reasons, oracle_labels, metrics)``.

    Whatever the attack returned, the outcome is an oracle when the runner handed it ground truth
    (``grants``, from :func:`oracle_grants`) or when the scorer had to pick among surplus candidates
    with the ground truth (``metrics["oracle_selection"]``) because the attack returned more images than
    the ``asked`` count its view declared. Surplus that comes from the declared count itself (DP-SGD
    declares the expected batch size; the realised Poisson batch was smaller) is the attacker's honest
    estimate: it is still paid for as blind guesses by the scorer, flagged ``count_mismatch``, and not
    labelled oracle. With the labels handed over
    (``labels_given``), label accuracy measures nothing the attack inferred: it is removed from the
    metrics and the outcome says ``oracle_labels``.
    """
    reasons = list(grants)
    returned = max(int(metrics.get("num_reconstructed", 0) or 0),  # images, or labels when more labels came back
                   int(metrics.get("batch_size", 0) or 0) + int(metrics.get("surplus_labels", 0) or 0)
                   if metrics.get("surplus_labels") else 0)
    surplus_by_count = metrics.get("oracle_selection") and asked is not None and returned <= asked
    if surplus_by_count:  # the attack returned the count it was told; the real batch was smaller (DP-SGD)
        metrics = {k: v for k, v in metrics.items() if k != "oracle_selection"}
        metrics["count_mismatch"] = True
    elif metrics.get("oracle_selection"):
        reasons.append(f"selection: the ground truth chose which of {metrics.get('num_reconstructed', '?')} "
                       f"reconstructions (and labels) to score against {metrics.get('batch_size', '?')} examples")
    if labels_given:
        metrics = {k: v for k, v in metrics.items() if k not in LABEL_METRICS}
    return bool(reasons), tuple(reasons), labels_given, metrics


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


def _reconstruct(attack: Any, view: ClientUpdate, progress: Any, seed: int) -> Reconstruction:
    """Run one attack with the global torch RNG forked and seeded, so draws inside the model (e.g. MID's
    stochastic bottleneck) are reproducible and identical on every backend."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return attack.reconstruct(view, progress)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the run
            return Reconstruction.failure(f"{type(exc).__name__}: {exc}")


def _invert(attack: Any, view: ReleasedModel, classes: list[int], progress: Any, seed: int) -> Reconstruction:
    """Run one model-inversion attack with the global torch RNG forked and seeded (see :func:`_reconstruct`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return attack.invert(view, classes, progress)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the run
            return Reconstruction.failure(f"{type(exc).__name__}: {exc}")


def run_model_attack(scenario: Scenario, index: int, spec: AttackSpec, rnd: int,
                     state: Mapping[str, torch.Tensor] | None, task: TaskInfo, device: torch.device,
                     progress: ProgressFactory | None = None) -> AttackOutcome:
    """One model-inversion attack on the model released after round ``rnd``, scored by an independent
    evaluation classifier (:func:`fedsim.metrics.model_inversion.score_model_inversion`)."""
    seed = derive_seed(scenario.seed, "attack", index, rnd, RELEASED_MODEL_ID)
    attack = attack_registry().get(spec.name).from_spec(spec, device, seed)
    classes = list(attack.params.target_classes or range(task.num_classes))
    label = f"{spec.name} r{rnd} released model"
    fn = progress(label, spec.budget.iterations) if progress else None  # candidates run as one batch
    start = time.perf_counter()
    if state is None:
        rec = Reconstruction.failure(f"the global model after round {rnd} was not kept")
    else:
        rec = _invert(attack, ReleasedModel(rnd, task, frozen_tensors(state)), classes, fn, seed)
    seconds = time.perf_counter() - start
    stats = dict(rec.stats)
    metrics: dict[str, Any] = {"failed": rec.failed} if rec.failed else {}
    if state is not None and not rec.failed:
        try:
            evaluator = load_evaluator(scenario.data, device)
            target = setup_for(scenario).build_model()
            target.load_state_dict(dict(state))
            target.to(device).eval()
            with torch.random.fork_rng(devices=[]):  # the released model may be stochastic (MID)
                torch.manual_seed(derive_seed(scenario.seed, "mi-score", index, rnd))
                metrics = score_model_inversion(rec, evaluator, target)
            stats.update(evaluator_accuracy=evaluator.accuracy, evaluator_val_size=float(evaluator.num_val))
        except (FedsimError, ValueError, RuntimeError, OSError) as err:  # e.g. no usable test split, disk errors
            metrics = {"failed": f"model-inversion scoring failed: {err}"}
    oracle, reasons, given, metrics = judge(metrics)  # a released model carries no ground truth
    return AttackOutcome(
        attack=spec.name, attack_index=index, round=rnd, partition_id=RELEASED_MODEL_ID, metrics=metrics,
        stats=stats, seconds=seconds, failed=rec.failed, oracle=oracle, oracle_reasons=reasons, oracle_labels=given,
        reconstruction=rec.images, truth=None, labels=rec.labels,
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


def run_attacks(
    scenario: Scenario,
    captured: Sequence[CapturedUpdate],
    task: TaskInfo,
    device: torch.device,
    defense_descriptions: Sequence[dict[str, Any]] = (),
    progress: ProgressFactory | None = None,
    released: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    failed_clients: Mapping[tuple[int, int], str] | None = None,
) -> list[AttackOutcome]:
    """Every (attack, targeted update) pair, in scenario order, then by round and client; model-inversion
    attacks once per attacked round on ``released`` (round -> global state after it). A targeted client
    that failed in that round (``failed_clients``: (round, partition id) -> reason) gets a failed outcome."""
    registry = attack_registry()
    fed = scenario.federation
    outcomes: list[AttackOutcome] = []
    for index, spec in enumerate(scenario.attacks):
        if attacks_model(spec):
            for rnd in released_rounds(spec, fed.rounds):
                outcomes.append(run_model_attack(scenario, index, spec, rnd, (released or {}).get(rnd), task, device,
                                                 progress))
            continue
        rounds = set(spec.target_rounds(fed.rounds))
        clients = set(spec.target_clients(fed.clients))
        targets = sorted((c for c in captured if c.round in rounds
                          and (c.partition_id in clients or c.partition_id == AGGREGATE_ID)),
                         key=lambda c: (c.round, c.partition_id))
        lost = not_attacked(scenario, spec, captured, failed_clients)
        cls = registry.get(spec.name)
        for cap in sorted([*targets, *lost], key=lambda c: c if isinstance(c, tuple) else (c.round, c.partition_id)):
            if isinstance(cap, tuple):  # no update to attack: the client failed, or was not sampled, in that round
                reason = lost[cap]
                outcomes.append(AttackOutcome(attack=spec.name, attack_index=index, round=cap[0], partition_id=cap[1],
                                              metrics={}, stats={}, seconds=0.0, failed=reason))
                continue
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
            grants = (*oracle_grants(spec.knowledge), *input_grants(view, cap.truth.inputs))
            public = dataset_public_ranking(scenario.data, cap.truth.inputs.shape[1]) if task.is_text else None
            oracle, reasons, given, metrics = judge(score_reconstruction(rec, cap.truth, public_tokens=public), grants,
                                                    labels_given="labels" in view.side_info,
                                                    asked=view.examples_to_reconstruct)
            text = task.is_text
            outcomes.append(AttackOutcome(
                attack=spec.name, attack_index=index, round=cap.round, partition_id=cap.partition_id,
                metrics=metrics, stats=dict(rec.stats), seconds=seconds, failed=rec.failed, oracle=oracle,
                oracle_reasons=reasons, oracle_labels=given, reconstruction=rec.images,
                truth=None if text else cap.truth.inputs, labels=rec.labels, staleness=cap.staleness,
                manipulated_by=_manipulator(scenario, index, cap), tokens=_ids(rec.tokens),
                truth_tokens=_ids(cap.truth.inputs) if text else None, token_set=_ids(rec.token_set),
            ))
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
