"""The model registry and the shape checks the builders share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.registry import Registry
from fedsim.scenario import ModelSpec

InputShape = tuple[int, ...]  # (C, H, W) of an image, (d,) of a feature vector, (T,) of a token sequence
# (spec, input shape, outputs) -> model; a text model's builder also takes ``vocab_size=`` (keyword)
ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")

TEXT_MODELS: dict[str, str] = {}  # text model name -> the task kind it is built for


def declare_text_model(name: str, task: str) -> None:
    """Declare ``name`` a text model (token inputs (T,), built with ``vocab_size=``) for ``task``
    (``language_modeling``: outputs one logit per vocabulary token and position; ``classification``)."""
    TEXT_MODELS[name] = task


def activation_of(spec: ModelSpec, default: str) -> str:
    """The scenario's activation override, else the architecture's own default."""
    return spec.activation or default


def check_io(name: str, input_shape: InputShape, num_classes: int, *, vectors: bool = False) -> None:
    """Reject malformed input shapes and output counts with a ScenarioError at ``model.name``.

    Every model takes images (C, H, W); one that flattens its input (``vectors=True``: ``mlp``, ``fc10``)
    also takes feature vectors (d,) of tabular data. ``num_classes`` is the number of outputs."""
    ranks = (1, 3) if vectors else (3,)
    if len(input_shape) not in ranks or any(int(d) < 1 for d in input_shape):
        what = "a (channels, height, width) image or a (features,) vector" if vectors else (
            "a (channels, height, width) image input: it is an image model (for tabular data use fc10 or mlp)")
        raise ScenarioError("model.name", f"{name} needs {what}, got {tuple(input_shape)}")
    if num_classes < 1:
        raise ScenarioError("model.name", f"{name} needs at least one output, got {num_classes}")


def check_min_size(name: str, input_shape: InputShape, min_hw: int) -> None:
    """Reject inputs smaller than ``min_hw`` x ``min_hw`` (the feature map would vanish)."""
    _, h, w = input_shape
    if h < min_hw or w < min_hw:
        raise ScenarioError(
            "model.name", f"{name} needs inputs of at least {min_hw}x{min_hw} pixels, got {h}x{w}"
        )


def flat_size(name: str, features: nn.Module, input_shape: InputShape) -> int:
    """Number of features ``features`` produces per example, by one dry forward pass.

    Runs in eval mode without gradients, so no dropout mask or BatchNorm statistic is touched and no
    random number is drawn; the module's train/eval mode is restored afterwards.
    """
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise ScenarioError("model.name", f"{name} cannot take a {tuple(input_shape)} input: {err}") from None
    finally:
        features.train(was_training)
    if out.numel() == 0:
        raise ScenarioError("model.name", f"{name} maps a {tuple(input_shape)} input to an empty feature map")
    return out[0].numel()


def zero_inputs(model: nn.Module, input_shape: InputShape, n: int = 2) -> torch.Tensor:
    """``n`` zero examples of what ``model`` trains on, for validation probes: int64 token ids (n, T) for a text
    model (a ``vocab_size`` attribute; a float (n, T) would be read as a relaxed (n, T, V) input and fail), float32
    pixels (n, C, H, W) or features (n, d) otherwise."""
    dtype = torch.long if getattr(model, "vocab_size", 0) else torch.float32
    return torch.zeros((n, *input_shape), dtype=dtype)
