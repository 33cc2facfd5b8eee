"""Test support for the malicious-server attacks: a client training on the model a malicious server sent, without a
federation (the manipulated model from ``manipulate()``, the client's gradient or local steps on a real batch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedsim.attacks.robbing_the_fed import RobbingTheFed
from fedsim.data import load_dataset, normalize
from fedsim.models import build_model
from fedsim.models.manipulation import apply_architecture
from fedsim.scenario import Budget, DataSpec, Knowledge, ModelSpec
from fedsim.threat import ClientUpdate, ManipulationView, ServerModel, TaskInfo


def rtf_attack(seed: int = 0, **params) -> RobbingTheFed:
    """A Robbing-the-Fed attack with these params (validated), knowledge granting auxiliary data."""
    return RobbingTheFed(RobbingTheFed.Params.model_validate(params),
                         Knowledge(local_hparams=True, auxiliary_data=True), Budget(iterations=0),
                         torch.device("cpu"), seed)


def setup(dataset: str, model: str = "convnet", protocol: str = "fedsgd", seed: int = 0):
    """(bundle, ModelSpec, TaskInfo, honest model)."""
    bundle = load_dataset(DataSpec(dataset=dataset))
    spec = ModelSpec(name=model)
    net = build_model(spec, bundle.input_shape, bundle.num_classes, seed=seed)
    task = TaskInfo(bundle.name, bundle.input_shape, bundle.num_classes, bundle.mean, bundle.std,
                    spec.model_dump(), protocol)
    return bundle, spec, task, net


def view_for(task: TaskInfo, net: torch.nn.Module, auxiliary: torch.Tensor | None) -> ManipulationView:
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return ManipulationView(1, task, state, (0,), auxiliary=auxiliary)


def client_model(task: TaskInfo, sent: ServerModel) -> torch.nn.Module:
    """What a client builds: the agreed architecture, the sent changes applied, the sent state loaded."""
    model = build_model(ModelSpec(**dict(task.model)), task.input_shape, task.num_classes)
    model = apply_architecture(model, sent.architecture)
    model.load_state_dict(dict(sent.state), strict=True)
    return model.train()


def client_update(task: TaskInfo, sent: ServerModel, x: torch.Tensor, y: torch.Tensor, *, steps: int = 1,
                  lr: float = 0.1, minibatch: int | None = None, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The update a client sends after training on (x, y) (pixel space): FedSGD (``steps`` 1, ``task.protocol``
    fedsgd) the mean-loss gradient; FedAvg ``steps`` SGD steps of ``lr`` over minibatches of ``minibatch`` (cycled),
    the weight delta. ``weight`` multiplies it (an aggregate's share)."""
    model = client_model(task, sent)
    xn = normalize(x, task.mean, task.std)
    names = [n for n, _ in model.named_parameters()]
    if task.protocol == "fedsgd":
        loss = F.cross_entropy(model(xn), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return {n: weight * g.detach() for n, g in zip(names, grads, strict=True)}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    size = minibatch or len(x)
    chunks = math.ceil(len(x) / size)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        part = slice((k % chunks) * size, (k % chunks + 1) * size)
        opt.zero_grad()
        F.cross_entropy(model(xn[part]), y[part]).backward()
        opt.step()
    return {k: weight * (v.detach() - before[k]) for k, v in model.state_dict().items()}


def observed(task: TaskInfo, sent: ServerModel, update: dict[str, torch.Tensor], n: int) -> ClientUpdate:
    """The server's view of ``update`` of the model it sent."""
    return ClientUpdate(1, 0, task, dict(sent.state), update, n, architecture=sent.architecture)


def psnr_matched(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per truth image the PSNR (dB, 10 log10(1 / mse)) of its best one-to-one match among ``images``
    (brute force by scipy's Hungarian solver on the MSE matrix; a truth image without a match gets 0 dB)."""
    from scipy.optimize import linear_sum_assignment

    mse = ((images.flatten(1)[:, None, :].double() - truth.flatten(1)[None, :, :].double()) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(mse.numpy())
    out = torch.zeros(truth.shape[0], dtype=torch.float64)
    out[torch.as_tensor(cols)] = 10 * torch.log10(1.0 / mse[rows, cols].clamp_min(1e-30))
    return out
