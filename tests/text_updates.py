"""Client updates of fedsim's text models for attack tests, computed here with torch (no dataset, no fedsim client
code): the gradient of one batch (fedsgd), the weight delta of local steps (fedavg), or a DP-SGD-style noisy clipped
gradient (per-example clipping to ``clip``, Gaussian noise ``sigma * clip`` on the sum, divided by B)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsim.models import build_model
from fedsim.scenario import ModelSpec
from fedsim.threat import ClientUpdate, TaskInfo
from fedsim.training import lm_loss

CLASSES = 3  # bert's classes


def text_model(name: str, seq_len: int, vocab: int, width: int = 128, depth: int = 2,
               seed: int = 0) -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec(name=name, width=width, depth=depth)
    classes = vocab if name == "gpt" else CLASSES
    return build_model(spec, (seq_len,), classes, seed=seed, vocab_size=vocab), spec


def labels_for(name: str, x: torch.Tensor) -> torch.Tensor:
    """gpt: the tokens themselves; bert: a class per sequence (its first token mod 3)."""
    return x if name == "gpt" else x[:, 0] % CLASSES


def loss_of(name: str, model: torch.nn.Module, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    out = model(x)
    y = labels_for(name, x)
    return lm_loss(out, y, reduction) if name == "gpt" else F.cross_entropy(out, y, reduction=reduction)


def gradient(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_of(name, model, x), list(params.values()))
    return {n: g.detach() for n, g in zip(params, grads, strict=True)}


def dp_gradient(name: str, model: torch.nn.Module, x: torch.Tensor, sigma: float, clip: float,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """DP-SGD's noisy mean of per-example gradients clipped to ``clip`` (Abadi et al. 2016, Alg. 1)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        g = gradient(name, model, x[i:i + 1])
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        factor = min(1.0, clip / float(norm))
        for n in total:
            total[n] += factor * g[n]
    gen = torch.Generator().manual_seed(seed)
    return {n: (v + sigma * clip * torch.randn(v.shape, generator=gen)) / len(x) for n, v in total.items()}


def text_update(name: str, batches: list[torch.Tensor], vocab: int, width: int = 128, depth: int = 2,
                protocol: str = "fedsgd", lr: float = 0.1, optimizer: str = "sgd", momentum: float = 0.0,
                weight_decay: float = 0.0, dp: tuple[float, float] | None = None,
                grant_labels: bool = False) -> ClientUpdate:
    """The update of a client holding ``batches`` (each (B, T) int64) on a seed-0 ``name`` model, as the attacker's
    view ``fedsim.attacking.observe`` builds under the default ``Knowledge()``: nothing granted (no ``side_info``,
    ``hyperparams`` or ``defenses``), so a test cannot pass because the attack read the truth.

    fedsgd: the gradient of ``batches[0]`` (``dp=(sigma, clip)``: DP-SGD's noisy clipped mean); fedavg: the delta
    after one local step per batch with ``optimizer``. ``grant_labels`` (bert only, as ``knowledge.labels: known``):
    ``side_info["labels"]`` = the batch's classes; a gpt's labels are its input text, which validation refuses to
    grant (fedsim.task_checks), so that raises ValueError."""
    if grant_labels and name == "gpt":
        raise ValueError("a language model's labels are its input tokens: validation refuses to grant them")
    seq_len = batches[0].shape[1]
    model, spec = text_model(name, seq_len, vocab, width, depth)
    model.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if protocol == "fedsgd":
        x = batches[0]
        update = gradient(name, model, x) if dp is None else dp_gradient(name, model, x, *dp)
    else:
        opt = (torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay) if optimizer == "adam" else
               torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay))
        for x in batches:
            opt.zero_grad()
            loss_of(name, model, x).backward()
            opt.step()
        update = {k: (v - state[k]).detach() for k, v in model.state_dict().items()}
    kind = "language_modeling" if name == "gpt" else "classification"
    classes = vocab if name == "gpt" else CLASSES
    task = TaskInfo("synthetic-text", (seq_len,), classes, (), (), spec.model_dump(), protocol, kind=kind,
                    vocab_size=vocab)
    side_info = {"labels": labels_for(name, batches[0]).clone()} if grant_labels else {}
    return ClientUpdate(0, 0, task, state, update, len(batches[0]), side_info=side_info)
