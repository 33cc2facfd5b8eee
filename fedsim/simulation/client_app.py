"""The ClientApp: a client's local round, its defenses, and its reply.

Reply content: ``arrays`` holds what the protocol sends (fedsgd: the gradient of one batch;
fedavg: the new weights), ``metrics`` holds ``num-examples`` (FedAvg weighting) and
``partition-id`` (node ids are random per run). When the server's capture proxy asks for it, the
client also attaches its real batch under ``fedsim.truth``; the proxy strips that record before
any strategy or attack sees the reply, and hands it to the evaluator only.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from defenses.base import Defense, UpdateContext
from fedsim.scenario import Scenario
from fedsim.simulation import keys
from fedsim.simulation.setup import setup_for
from fedsim.training import TrainingJob, local_update


def _apply_update_defenses(setup, result, global_state, ctx: UpdateContext) -> dict[str, torch.Tensor]:
    """Run client-side update transforms on the quantity actually sent (gradient or weight delta)."""
    update = result.update
    defenses = [d for d in setup.defenses if type(d).transform_update is not Defense.transform_update]
    if not defenses:
        return update
    if ctx.protocol == "fedavg":  # defenses act on the delta, the client then sends global + delta
        delta = {k: v - global_state[k].to(v.device) for k, v in update.items() if v.is_floating_point()}
        for d in defenses:
            delta, noise = d.transform_update(delta, ctx)
            result.extras.update({f"{d.name}/{k}": v for k, v in noise.items()})
        return {k: (global_state[k].to(v.device) + delta[k]) if k in delta else v for k, v in update.items()}
    for d in defenses:
        update, noise = d.transform_update(update, ctx)
        result.extras.update({f"{d.name}/{k}": v for k, v in noise.items()})
    return update


def _load_state(context: Context) -> dict[str, str]:
    record = context.state.config_records.get(keys.CLIENT_STATE)
    return {k: str(v) for k, v in record.items()} if record is not None else {}


def _save_state(context: Context, state: dict[str, str]) -> None:
    if state:
        context.state[keys.CLIENT_STATE] = ConfigRecord(dict(state))


def build_client_app(scenario: Scenario) -> ClientApp:
    """A ClientApp running ``scenario``'s local training (``scenario`` is small and pickles to Ray)."""
    app = ClientApp()
    from defenses import build_defenses

    mods = [mod for defense in build_defenses(scenario) for mod in defense.client_mods()]

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        setup = setup_for(scenario)
        pid = int(context.node_config[keys.PARTITION_ID])
        config = msg.content[keys.CONFIG]
        rnd = int(config[keys.SERVER_ROUND])
        record = bool(config.get(keys.RECORD_TRUTH, False))
        global_state = msg.content[keys.ARRAYS].to_torch_state_dict()

        model = setup.build_model()
        model.load_state_dict(global_state)
        inputs, labels = setup.client_data(pid)
        state = _load_state(context)
        job = TrainingJob(model, state=state, seed=scenario.seed, round=rnd, partition_id=pid,
                          num_examples=len(inputs))
        for defense in setup.defenses:
            job = defense.wrap_training(job)
        fed = scenario.federation
        result = local_update(
            job, inputs, labels, local=fed.local, protocol=fed.protocol,
            mean=setup.task.mean, std=setup.task.std, seed=scenario.seed,
            round_num=rnd, partition_id=pid, device=setup.device, record=record,
        )
        _save_state(context, job.state)
        ctx = UpdateContext(scenario.seed, rnd, pid, fed.protocol, result.num_examples)
        update = _apply_update_defenses(setup, result, global_state, ctx)

        content = RecordDict({
            keys.ARRAYS: ArrayRecord({k: v.detach().cpu() for k, v in update.items()}),
            keys.METRICS: MetricRecord({
                keys.NUM_EXAMPLES: result.num_examples,
                keys.PARTITION_ID: pid,
                keys.TRAIN_LOSS: result.train_loss,
                **{f"{keys.CLIENT_METRIC_PREFIX}{k}": float(v) for k, v in result.metrics.items()},
            }),
        })
        if record:
            truth = {"inputs": inputs[result.used_indices], "labels": labels[result.used_indices]}
            truth.update({f"extra/{k}": v.detach().cpu() for k, v in result.extras.items()})
            content[keys.TRUTH] = ArrayRecord(truth)
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tell the server which data partition this node holds (node ids are random per run)."""
        pid = int(context.node_config[keys.PARTITION_ID])
        return Message(RecordDict({keys.METRICS: MetricRecord({keys.PARTITION_ID: pid})}), reply_to=msg)

    return app
