"""Victim models: a registry of builders plus :func:`build_model`, the one way fedsim makes a model.

Every model is built from a :class:`~fedsim.scenario.ModelSpec` (name, width, norm, dropout,
activation), an input shape ((C, H, W) images; (d,) feature vectors for the models that flatten their
input, ``mlp`` and ``fc10``) and an output count (the classes, or 1 for a regression). All dropout is
:class:`MaskDropout`, so attacks can record or impose dropout masks (Scheliga et al., AAAI 2023), and
every model supports double backward, which gradient inversion needs. A new architecture is one new
module in this package with an ``@MODELS.register("name")`` builder; it is imported automatically.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.discovery import import_submodules
from fedsim.errors import ScenarioError
from fedsim.models.base import MODELS, TEXT_MODELS, InputShape, ModelBuilder
from fedsim.models.layers import (
    MaskDropout,
    dropout_layers,
    make_activation,
    make_norm,
    record_masks,
    recorded_masks,
    set_masks,
)
from fedsim.scenario import ModelSpec
from fedsim.seeding import seed_torch

import_submodules(__name__, __path__, skip=("base", "layers"))

__all__ = [
    "MODELS",
    "TEXT_MODELS",
    "InputShape",
    "MaskDropout",
    "ModelBuilder",
    "build_model",
    "dropout_layers",
    "make_activation",
    "make_norm",
    "record_masks",
    "recorded_masks",
    "set_masks",
]


def build_model(
    spec: ModelSpec, input_shape: InputShape | tuple[int, ...], num_classes: int, seed: int | None = None,
    vocab_size: int = 0,
) -> nn.Module:
    """Build ``spec.name`` for ``input_shape`` = (C, H, W) or (d,) and ``num_classes`` outputs (in train mode;
    a regression task passes its ``output_dim``, 1). Text: ``input_shape`` = (T,) token ids of a
    ``vocab_size``-token vocabulary (``vocab_size`` > 0 exactly for text data); only the models declared with
    :func:`~fedsim.models.base.declare_text_model` (``gpt``, ``bert``) take it, and only they take ``model.depth``
    and ``model.pretrain``.

    With ``seed``, the initial weights depend only on the seed: initialization runs inside
    ``torch.random.fork_rng`` so the caller's global RNG state is left as it was. Without a seed the
    global RNG is used (and advanced) as usual. Unknown names and input shapes the architecture
    cannot take raise :class:`~fedsim.errors.ScenarioError` naming the ``model.*`` field.
    """
    if spec.name not in MODELS:
        raise ScenarioError("model.name", f"unknown model {spec.name!r} (known: {', '.join(MODELS)})")
    builder = MODELS.get(spec.name)
    shape = tuple(int(d) for d in input_shape)
    _check_text(spec, shape, num_classes, vocab_size)
    if len(shape) not in (1, 3):
        raise ScenarioError("model.name", f"{spec.name} needs a (channels, height, width) or (features,) input, "
                                          f"got {shape}")
    kwargs = {"vocab_size": vocab_size} if spec.name in TEXT_MODELS else {}
    if seed is None:
        return builder(spec, shape, num_classes, **kwargs)
    with torch.random.fork_rng(devices=[]):
        seed_torch(seed)
        return builder(spec, shape, num_classes, **kwargs)


def _check_text(spec: ModelSpec, shape: tuple[int, ...], num_classes: int, vocab_size: int) -> None:
    """Text models on token data only, and token data on text models only (ScenarioError at ``model.*``)."""
    text_model = spec.name in TEXT_MODELS
    if vocab_size > 0 and not text_model:
        raise ScenarioError("model.name", f"{spec.name} is not a text model, and the data are token sequences "
                                          f"(use one of: {', '.join(sorted(TEXT_MODELS))})")
    if text_model and vocab_size <= 0:
        raise ScenarioError("model.name", f"{spec.name} is a text model; the data are not token sequences "
                                          "(use a text dataset, e.g. kjv)")
    if not text_model:
        for field in ("depth", "pretrain"):
            if getattr(spec, field) is not None:
                raise ScenarioError(f"model.{field}", f"only text models ({', '.join(sorted(TEXT_MODELS))}) take "
                                                      f"{field}; {spec.name} would ignore it")
        return
    if spec.norm != "none":  # every block has its LayerNorms; the option would be silently ignored
        raise ScenarioError("model.norm", f"{spec.norm}: {spec.name} normalizes with a LayerNorm in every block and "
                                          "takes no other norm (remove model.norm)")
    if len(shape) != 1 or shape[0] < 2:
        raise ScenarioError("model.name", f"{spec.name} needs (T,) token sequences with T >= 2, got {shape}")
    if TEXT_MODELS[spec.name] == "language_modeling" and num_classes != vocab_size:
        raise ScenarioError("model.name", f"{spec.name} is a language model (one logit per vocabulary token); the "
                                          f"task has {num_classes} classes, not the {vocab_size}-token vocabulary")
