"""Can DP-SGD train this model? The validation-time check behind ``DPSGD.check_model``.

Two faults otherwise surface only when the first client trains:

* a model that cannot take a training step on one example (BatchNorm swapped for GroupNorm with one
  value per group, e.g. a ResNet's last stage on 8x8 inputs): DP-SGD's Poisson batches can hold a
  single example, and ``functorch`` differentiates every example on its own;
* a per-sample gradient mode that cannot differentiate the model's operations per example, e.g.
  ExpandedWeights (``ew``) on a ViT, whose class token is expanded outside any supported layer.

The second is found by doing what a client does, on a copy: Opacus's ``prepare_module`` in the
scenario's mode, one forward and backward pass on two zero examples.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.base import zero_inputs
from fedsim.training import min_train_batch


def per_sample_problem(model: nn.Module, input_shape: tuple[int, ...], mode: str,
                       prepare_module: Callable[..., Any]) -> str | None:
    """Why DP-SGD with ``grad_sample_mode`` ``mode`` cannot train ``model`` (already transformed for
    Opacus) on inputs of ``input_shape`` (C, H, W), (d,) or (T,) token ids, or None. ``prepare_module`` is Opacus's
    ``opacus.grad_sample.utils.prepare_module`` (imported by the caller). The global RNG and ``model``
    are left untouched (the probe runs on a copy)."""
    if min_train_batch(model, input_shape) > 1:
        return ("dp_sgd: this model cannot take a training step on a single example (a normalization layer "
                "has one value per group or channel), and DP-SGD batches can hold one (Poisson sampling; "
                "per-example gradients): use larger inputs, another model.name or model.norm: none")
    if mode == "ghost":  # ghost clipping needs the DP loss wrapper; it runs every layer 'hooks' can
        return None
    if mode == "bk":  # book-keeping is not Opacus's: fedsim.defenses.dp_modes.bk_problem checks it
        from fedsim.defenses.dp_modes import bk_problem

        return bk_problem(model, input_shape)
    probe = copy.deepcopy(model).train()
    wrapped = None
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            wrapped = prepare_module(probe, mode, wrap_model=mode == "ew", batch_first=True, loss_reduction="mean")
            x = zero_inputs(probe, input_shape)
            logits = wrapped(x) if mode == "ew" else probe(x)
            # any scalar of the outputs exercises the per-example machinery: cross-entropy for (2, classes),
            # the mean for a language model's (2, T, V) logits
            loss = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)) if logits.dim() == 2 else logits.mean()
            loss.backward()
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return (f"params.grad_sample_mode: Opacus {mode!r} cannot compute per-example gradients of this model "
                f"({type(err).__name__}: {first}); use grad_sample_mode: hooks")
    finally:
        if wrapped is not None and hasattr(wrapped, "cleanup"):
            wrapped.cleanup()
    return None

