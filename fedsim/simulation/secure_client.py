"""The SecAgg+ client: Flower's legacy NumPyClient around the shared client round.

SecAgg+ exists in Flower 1.41/1.42 only on the legacy path (``secaggplus_mod`` converts replies with
``recorddict_to_fitres``), so this client is a ``NumPyClient`` in a legacy ``ClientApp(client_fn=...,
mods=[client_errors_mod, partition_query_mod, secaggplus_mod])``. Its ``fit`` runs
:func:`~fedsim.simulation.client_round.run_client_round`, the same pipeline as the Message-API
ClientApp: every defense's ``wrap_training`` and ``transform_update``, the client's persistent state
(``client_fn`` receives the node's persistent ``Context``: Flower 1.42's NumPyClient has no context of
its own, so it is handed in) and the same reply metrics.

What the server learns: ``secaggplus_mod`` masks only the parameters. ``num_examples`` and the FitRes
metrics travel in plaintext beside the masked vector (the mod clears only the reply's array
records), so the server does see each client's ``partition-id``, ``train-loss`` and defense metrics
such as ``fedsim.epsilon``, exactly as a Flower SecAgg+ deployment returning these metrics would
reveal them; fedsim records them like on the plain path (``client_metrics``). The ground-truth
record never rides along (the server could read it): the evaluator re-derives it
(:mod:`fedsim.simulation.secure`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Scalar

from fedsim.models.manipulation import decode
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed
from fedsim.simulation import keys
from fedsim.simulation.client_app import partition_reply
from fedsim.simulation.client_round import load_state, run_client_round, save_state
from fedsim.simulation.malicious import sent_layout
from fedsim.simulation.participation import client_errors_mod
from fedsim.simulation.setup import setup_for


class SecureClient(NumPyClient):
    """One node's client: ``fit`` is the shared round, on the global weights as Flower's ndarray list."""

    def __init__(self, scenario: Scenario, context: Context) -> None:
        self.scenario, self.context = scenario, context
        self.pid = int(context.node_config[keys.PARTITION_ID])

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
        """(what is sent, in ``state_dict`` order; num_examples; metrics). fedsgd pads buffers with zeros
        so every reply has one layout."""
        rnd = int(config[keys.SERVER_ROUND])
        architecture = decode(str(config.get(keys.ARCHITECTURE, "")))  # a malicious server's changes, if any
        names = sent_layout(setup_for(self.scenario), architecture)  # the received model's key layout
        global_state = {k: torch.from_numpy(np.array(v)) for k, v in zip(names, parameters, strict=True)}
        state = load_state(self.context)
        reply = run_client_round(self.scenario, self.pid, rnd, global_state, state, architecture=architecture)
        save_state(self.context, state)
        sent = [reply.sent.get(k, torch.zeros_like(v)).numpy() for k, v in global_state.items()]
        # secaggplus_mod quantizes with stochastic rounding from NumPy's global generator: seed it
        np.random.seed(derive_seed(self.scenario.seed, "secagg-rounding", rnd, self.pid) % 2**32)
        return sent, reply.num_examples, dict(reply.metrics)


def partition_query_mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Answer the server's QUERY (which partition this node holds), which the legacy client cannot."""
    if msg.metadata.message_type == MessageType.QUERY:
        return partition_reply(msg, ctx)
    return call_next(msg, ctx)


def build_secure_client_app(scenario: Scenario) -> ClientApp:
    """The legacy ClientApp: error replies with one-line reasons, partition queries, then SecAgg+."""
    def client_fn(context: Context):  # noqa: ANN202 - Flower's legacy Client
        return SecureClient(scenario, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[client_errors_mod, partition_query_mod, secaggplus_mod])
