"""The ClientApp (Message API): one client's round through the shared pipeline, and its reply.

The round itself (model, defenses' training wrappers, local training, update-stage defenses, the
reported metrics and the ground truth) is :func:`fedsim.simulation.client_round.run_client_round`,
the same pipeline the SecAgg+ client runs. Reply content: ``arrays`` holds what the protocol sends
(fedsgd: the gradient of one batch; fedavg: the new weights), ``metrics`` holds ``num-examples``
(FedAvg weighting), ``partition-id`` (node ids are random per run), ``train-loss`` and the defenses'
metrics (``fedsim.*``). When the server's capture proxy asks for it, the client also attaches its
real batch under ``fedsim.truth``; the proxy strips that record before any strategy or attack sees
the reply, and hands it to the evaluator only. An exception becomes an error reply with a one-line
reason (:func:`~fedsim.simulation.participation.client_errors_mod`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.models.manipulation import decode
from fedsim.scenario import Scenario
from fedsim.simulation import keys
from fedsim.simulation.client_round import load_state, run_client_round, save_state
from fedsim.simulation.participation import client_errors_mod
from fedsim.simulation.records import to_record, to_state


def partition_reply(msg: Message, context: Context) -> Message:
    """The reply to the server's QUERY: which data partition this node holds (node ids are random per run)."""
    pid = int(context.node_config[keys.PARTITION_ID])
    return Message(RecordDict({keys.METRICS: MetricRecord({keys.PARTITION_ID: pid})}), reply_to=msg)


def build_client_app(scenario: Scenario) -> ClientApp:
    """A ClientApp running ``scenario``'s local training (``scenario`` is small and pickles to Ray)."""
    app = ClientApp(mods=[client_errors_mod])
    from fedsim.defenses import build_defenses

    mods = [mod for defense in build_defenses(scenario) for mod in defense.client_mods()]

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        config = msg.content[keys.CONFIG]
        record = bool(config.get(keys.RECORD_TRUTH, False))
        state = load_state(context)
        reply = run_client_round(scenario, int(context.node_config[keys.PARTITION_ID]),
                                 int(config[keys.SERVER_ROUND]), to_state(msg.content[keys.ARRAYS]),
                                 state, record=record, architecture=decode(str(config.get(keys.ARCHITECTURE, ""))))
        save_state(context, state)
        content = RecordDict({keys.ARRAYS: to_record(reply.sent), keys.METRICS: MetricRecord(reply.metrics)})
        if reply.truth is not None:
            content[keys.TRUTH] = to_record(reply.truth)
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return partition_reply(msg, context)

    return app
