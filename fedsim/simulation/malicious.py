"""A malicious server inside the federation: the manipulated model it sends, and the agreed model it keeps.

In each round a :class:`~fedsim.attacks.malicious.MaliciousAttack` of the scenario targets (``attacks[i].rounds``), the
server (``server.role: malicious``) builds a :class:`~fedsim.threat.ManipulationView` from the honest global model
it holds and calls the attack's ``manipulate`` (an instance seeded by ``derive_seed(seed, "manipulate", i, round)``,
under a forked torch RNG seeded alike, so both backends send the same model). The returned
:class:`~fedsim.threat.ServerModel` goes out through the normal TRAIN message: its ``state`` replaces the arrays
and its architecture changes travel as JSON in the config (``keys.ARCHITECTURE``,
:mod:`fedsim.models.manipulation`). Who receives it:

* plain Message-API path (FedAvg / FedSGD): the attack's target clients sampled this round, or every sampled client
  when ``to_all``; the others get the honest model. The capture proxy (outermost, so any strategy wrapper such as
  central DP sees only agreed-model replies) swaps the arrays (:meth:`Manipulator.outgoing`) and, once the replies
  are in and captured, turns each manipulated reply back into one of the agreed model (:meth:`Manipulator.restore`);
* SecAgg+ path: every client. SecAgg+ sums one flat vector layout, so all masked vectors must have the manipulated
  model's layout, and the server cannot single out one client's update anyway (it only learns the aggregate). The
  unmasked aggregate is restored the same way (:meth:`Manipulator.restore` on the aggregate).

Restoring (the federation continues on the agreed architecture): fedsgd keeps the agreed part of the gradient
(:func:`~fedsim.models.manipulation.agreed_part`); fedavg takes ``honest + (reply - sent)`` on the agreed keys, i.e.
the client's local change applied to the honest model. The captured update keeps what the server really observed
(``global_state`` = the manipulated state this client was sent, ``architecture`` = the changes), so the attack's
``reconstruct`` reads the manipulation back from it; ``manipulated_by`` = the manipulating attack's index, so
the runner files any OTHER attack on that update under the manipulator's letter too
(:func:`fedsim.threat_models.exercised_letter`).

The manipulation's cost: each attacked round's history row records ``honest_test_accuracy`` (the honest global model
of that round, before training), ``sent_test_accuracy`` (the model actually sent, with its architecture),
``sent_accuracy_drop`` (their difference) and ``manipulated_clients`` (how many received it). That is the cost of the
round's model only: the cost over the run (the honest replies lost to a manipulated model) is a comparison with the
same scenario under an honest server, which the benchmark and tutorial make.

Only a malicious server manipulates: the server builds a :class:`Manipulator` only when ``server.role`` is
``malicious``, and validation (:func:`fedsim.malicious_rules.check_scenario`) refuses a manipulating attack under
any other role, or one whose needed letter is not F-H; one manipulation per round (two malicious attacks may
not share a round: the server sends one model) and none with ``federation.staleness`` (a slow client's old model
would have to be manipulated and restored against another honest model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import Tensor

from fedsim.errors import SimulationError
from fedsim.malicious_rules import malicious_attacks
from fedsim.models.manipulation import agreed_part, apply_architecture, encode
from fedsim.scenario import AttackSpec, Scenario
from fedsim.seeding import derive_seed, seed_torch
from fedsim.simulation import keys
from fedsim.simulation.setup import FederationSetup, setup_for
from fedsim.threat import ManipulationView, ServerModel, frozen_tensors

__all__ = ["Manipulator", "Sent", "malicious_attacks", "sent_layout"]


def sent_layout(setup: FederationSetup, architecture: Sequence[dict]) -> list[str]:
    """The state keys, in ``state_dict`` order, of the agreed model with ``architecture`` applied: the layout
    a manipulated message (and, under SecAgg+, every masked vector) has on both sides."""
    return list(apply_architecture(setup.build_model(), architecture).state_dict())


@dataclass(frozen=True)
class Sent:
    """One round's manipulation: the attack, the model sent (``state`` in ``layout`` order) and who got it."""

    round: int
    attack_index: int
    model: ServerModel
    honest: dict[str, Tensor]
    state: dict[str, Tensor]
    layout: tuple[str, ...]
    receivers: tuple[int, ...]

    @property
    def architecture(self) -> tuple[dict, ...]:
        return tuple(dict(d) for d in self.model.architecture)


class Manipulator:
    """The malicious server's side of the federation, shared by both server paths (module doc)."""

    def __init__(self, scenario: Scenario) -> None:
        if scenario.server.role != "malicious":  # validation refuses this first (fedsim.malicious_rules)
            raise SimulationError(f"server.role is {scenario.server.role!r}: only a malicious server manipulates")
        self.scenario = scenario
        self.setup = setup_for(scenario)
        fed = scenario.federation
        self.by_round = {r: (i, spec, cls) for i, spec, cls in malicious_attacks(scenario)
                         for r in spec.target_rounds(fed.rounds)}
        self.sent: dict[int, Sent] = {}

    def build(self, rnd: int, honest: dict[str, Tensor], sampled: Sequence[int], *, to_all: bool = False
              ) -> Sent | None:
        """Ask round ``rnd``'s attack for the model to send (None: no attack this round, or none of its targets
        was sampled). ``honest``: the global model the server holds; ``sampled``: partition ids training this
        round; ``to_all``: send it to every sampled client whatever the attack says (SecAgg+)."""
        if rnd not in self.by_round:
            return None
        index, spec, cls = self.by_round[rnd]
        wanted = set(spec.target_clients(self.scenario.federation.clients))
        targets = tuple(p for p in sorted(sampled) if p in wanted)
        if not targets:
            return None
        seed = derive_seed(self.scenario.seed, "manipulate", index, rnd)
        attack = cls.from_spec(spec, self.setup.device, seed)
        view = self._view(rnd, spec, honest, targets)
        with torch.random.fork_rng(devices=[]):
            seed_torch(seed)
            model = attack.manipulate(view)
        if not isinstance(model, ServerModel):
            raise SimulationError(f"attacks[{index}] ({spec.name}).manipulate returned {type(model).__name__}, "
                                  "not a ServerModel")
        layout = tuple(sent_layout(self.setup, model.architecture))
        if set(model.state) != set(layout):
            odd = sorted(set(model.state) ^ set(layout))[:3]
            raise SimulationError(f"attacks[{index}] ({spec.name}) round {rnd}: the state it sends does not fit "
                                  f"the agreed model with its architecture changes (keys {odd})")
        state = {k: model.state[k].detach().to("cpu").clone() for k in layout}
        receivers = tuple(sorted(sampled)) if (to_all or model.to_all) else targets
        sent = Sent(rnd, index, model, {k: v.detach().cpu().clone() for k, v in honest.items()}, state, layout,
                    receivers)
        self.sent[rnd] = sent
        return sent

    def _view(self, rnd: int, spec: AttackSpec, honest: dict[str, Tensor], targets: tuple[int, ...]
              ) -> ManipulationView:
        knowledge, fed = spec.knowledge, self.scenario.federation
        hyperparams = {**fed.local.model_dump(), "protocol": fed.protocol} if knowledge.local_hparams else {}
        aux = labels = None
        if knowledge.auxiliary_data:  # the held-out test split, in pixel space [0, 1] (no client holds it)
            aux, labels = self.setup.data.test_x.clone(), self.setup.data.test_y.clone()
        return ManipulationView(rnd, self.setup.task, frozen_tensors(honest), targets, hyperparams=hyperparams,
                                auxiliary=aux, auxiliary_labels=labels)

    def received(self, rnd: int, pid: int) -> Sent | None:
        """Round ``rnd``'s manipulation if client ``pid`` received it, else None."""
        sent = self.sent.get(rnd)
        return sent if sent is not None and pid in sent.receivers else None

    def restore(self, sent: Sent, reply: dict[str, Tensor]) -> dict[str, Tensor]:
        """A reply to the manipulated model as a reply to the agreed one (module doc), in the honest model's order:
        fedsgd: the agreed part of the gradient; fedavg: ``honest + (reply - sent)`` on the agreed keys."""
        if self.scenario.federation.protocol == "fedsgd":
            part = agreed_part(reply, sent.model.architecture)
            return {k: part[k].to(sent.honest[k].dtype) for k in sent.honest if k in part}
        return {k: (h + (reply[k].to(torch.float64) - sent.state[k].to(torch.float64)).to(h.dtype))
                if h.is_floating_point() else h + (reply[k] - sent.state[k]).to(h.dtype)
                for k, h in sent.honest.items() if k in reply}

    # -- the plain Message-API path (called by the capture proxy) --------------------------------------------
    def outgoing(self, messages: list[Message], partition_of_node: dict[int, int]) -> list[Message]:
        """The round's TRAIN messages, the receivers' carrying the manipulated model (the others untouched)."""
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return messages
        rnd = int(train[0].content[keys.CONFIG][keys.SERVER_ROUND])
        honest = train[0].content[keys.ARRAYS].to_torch_state_dict()
        sent = self.build(rnd, honest, [partition_of_node[m.metadata.dst_node_id] for m in train])
        if sent is None:
            return messages
        out = []
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN and \
                    partition_of_node[msg.metadata.dst_node_id] in sent.receivers:
                content = RecordDict(dict(msg.content.items()))
                content[keys.ARRAYS] = ArrayRecord(sent.state)
                config = ConfigRecord(dict(msg.content[keys.CONFIG]))
                config[keys.ARCHITECTURE] = encode(sent.architecture)
                content[keys.CONFIG] = config
                msg = Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                              group_id=msg.metadata.group_id)
            out.append(msg)
        return out

    def restore_replies(self, rnd: int, replies: Iterable[Message], pid_of: Callable[[Message], int]) -> None:
        """Replace, in place, each manipulated client's reply arrays by their agreed-model version."""
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                continue
            sent = self.received(rnd, pid_of(reply))
            if sent is not None:
                reply.content[keys.ARRAYS] = ArrayRecord(self.restore(sent, reply.content[keys.ARRAYS]
                                                                      .to_torch_state_dict()))

    # -- the cost, for the round's history row -------------------------------------------------------------
    def row(self, rnd: int) -> dict[str, float]:
        """``manipulated_clients`` and (classification) the honest and sent models' test accuracy, their
        difference and ``sent_test_examples`` (how many test images both were scored on), for a round with a
        manipulation; {} otherwise."""
        sent = self.sent.get(rnd)
        if sent is None:
            return {}
        row: dict[str, float] = {"manipulated_clients": len(sent.receivers)}
        honest = self._accuracy(rnd, sent.honest, ())
        manipulated = self._accuracy(rnd, sent.state, sent.architecture)
        if honest is not None and manipulated is not None:
            row.update(honest_test_accuracy=honest, sent_test_accuracy=manipulated,
                       sent_accuracy_drop=honest - manipulated,
                       sent_test_examples=float(len(self.setup.data.test_y)))  # the accuracies' denominator
        return row

    def _accuracy(self, rnd: int, state: dict[str, Tensor], architecture: Sequence[dict]) -> float | None:
        from fedsim.training import evaluate

        setup, data = self.setup, self.setup.data
        model = apply_architecture(setup.build_model(), architecture)
        model.load_state_dict(state)
        with torch.random.fork_rng(devices=[]):
            seed_torch(derive_seed(self.scenario.seed, "eval", rnd))
            return evaluate(model, data.test_x, data.test_y, mean=data.mean, std=data.std,
                            batch_size=self.scenario.evaluation.batch_size, device=setup.device, task=data.task)[1]
