"""The model registry and the shape checks the builders share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.registry import Registry
from fedsim.scenario import ModelSpec

InputShape = tuple[int, int, int]
ModelBuilder = Callable[[ModelSpec, InputShape, int], nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")


def activation_of(spec: ModelSpec, default: str) -> str:
    """The scenario's activation override, else the architecture's own default."""
    return spec.activation or default


def check_io(name: str, input_shape: InputShape, num_classes: int) -> None:
    """Reject malformed input shapes and class counts with a ScenarioError."""
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        reason = f"{name} needs a (channels, height, width) input, got {input_shape}"
        raise ScenarioError("model.name", reason)
    if num_classes < 1:
        raise ScenarioError("model.name", f"{name} needs at least one class, got {num_classes}")


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
