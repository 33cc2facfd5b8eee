"""Test helpers shared by the attack tests: a client's update built directly from a model and a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.data import normalize
from fedsim.scenario import ModelSpec
from fedsim.threat import ClientUpdate, TaskInfo


def make_update(model: nn.Module, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, bundle,
                protocol: str = "fedsgd", lr: float = 0.1) -> ClientUpdate:
    """The update a client sends for batch (x, y) in pixel space (train mode, mean cross-entropy).

    fedsgd: the gradient per parameter name; fedavg: one local SGD step, delta = -lr * grad on the
    parameters and 0 on buffers, with the local hyperparameters granted. The true labels ride in
    ``side_info`` (an attack reads them only when its knowledge says ``labels: known``).
    """
    model.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(normalize(x, bundle.mean, bundle.std)), y)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    update = {n: g.detach() for n, g in zip(names, grads, strict=True)}
    hyperparams = {}
    if protocol == "fedavg":
        update = {k: -lr * update[k] if k in update else torch.zeros_like(v) for k, v in state.items()}
        hyperparams = {"lr": lr, "steps": 1, "batch_size": len(x), "optimizer": "sgd", "momentum": 0.0}
    task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                    spec.model_dump(), protocol)
    return ClientUpdate(0, 0, task, state, update, len(x), hyperparams=hyperparams,
                        side_info={"labels": y.clone()})


BROKEN_UPDATES = ("nan", "zero", "none", "shape", "missing")


def broken_update(update: ClientUpdate, case: str, name: str = "classifier.weight") -> ClientUpdate:
    """``update`` with its tensors broken in one of the ways an attack must survive (BROKEN_UPDATES)."""
    grads = dict(update.update)
    if case == "nan":
        grads[name] = torch.full_like(grads[name], float("nan"))
    elif case == "zero":
        grads = {k: torch.zeros_like(v) for k, v in grads.items()}
    elif case == "none":
        grads = None
    elif case == "shape":
        grads[name] = torch.ones(3, 3)
    elif case == "missing":
        del grads[name]
    else:
        raise ValueError(case)
    return ClientUpdate(update.round, update.partition_id, update.task, update.global_state, grads,
                        update.num_examples, update.hyperparams, update.side_info, update.defenses)
