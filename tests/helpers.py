"""Test helpers shared by the attack tests: a client's update built directly from a model and a batch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

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
    return dataclasses.replace(update, update=grads)  # by name: positional fields shift when one is added


# --- what a trivial attacker scores --------------------------------------------------------------


def psnr_db(images: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR (dB) of ``images`` against ``truth`` in pixel space [0, 1], over the whole batch (one MSE)."""
    mse = F.mse_loss(images.float(), truth.float()).item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def trivial_guesses(truth: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images an attacker could return without reading the update, shaped like ``truth`` (N, C, H, W).

    Stronger than any blind attacker, on purpose: each image's own mean colour (per channel) filled
    flat - the best constant image under MSE, which needs the truth -, the batch's mean colour, mid
    grey, and uniform noise from a fixed seed. A reconstruction test asserts a margin over the best.
    """
    gen = torch.Generator().manual_seed(seed)
    return {
        "image mean colour": truth.mean(dim=(2, 3), keepdim=True).expand_as(truth).clone(),
        "batch mean colour": truth.mean(dim=(0, 2, 3), keepdim=True).expand_as(truth).clone(),
        "grey": torch.full_like(truth, 0.5),
        "uniform noise": torch.rand(truth.shape, generator=gen),
    }


def trivial_score(truth: torch.Tensor, metric: Callable[[torch.Tensor, torch.Tensor], float] = psnr_db,
                  higher_is_better: bool = True) -> tuple[float, str]:
    """The best score a trivial guess (:func:`trivial_guesses`) gets under ``metric(images, truth)``,
    and which guess it was: computed through the same metric as the reconstruction it is compared with."""
    scores = {name: float(metric(img, truth)) for name, img in trivial_guesses(truth).items()}
    pick = max if higher_is_better else min
    name = pick(scores, key=scores.__getitem__)
    return scores[name], name


def assert_beats_trivial(score: float, truth: torch.Tensor, margin: float,
                         metric: Callable[[torch.Tensor, torch.Tensor], float] = psnr_db,
                         higher_is_better: bool = True) -> float:
    """Assert ``score`` beats the best trivial guess by ``margin`` (in the metric's units); return the
    trivial score. With ``higher_is_better=False`` (MSE, LPIPS, a distance) it must be ``margin`` lower."""
    best, name = trivial_score(truth, metric, higher_is_better)
    if higher_is_better:
        assert score >= best + margin, f"{score:.3f} does not beat the {name} guess ({best:.3f}) by {margin}"
    else:
        assert score <= best - margin, f"{score:.3f} does not beat the {name} guess ({best:.3f}) by {margin}"
    return best


def referenced_names(path: Path) -> set[str]:
    """Every module, imported name, variable and attribute name a Python file mentions (for firewall tests:
    a module that never names ``GroundTruth`` or ``fedsim.metrics`` cannot reach the ground truth)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Name | ast.Attribute):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return names
