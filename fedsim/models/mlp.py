"""A fully connected victim, shaped after the MLP of the Dropout Inversion Attack paper.

Scheliga et al. (AAAI 2023) attack an MLP of 3 hidden layers of 512 units, each
``Linear (no bias) -> GELU -> Dropout``. Here the hidden width is ``16 * spec.width``, so the default
width 32 gives exactly that shape; the activation defaults to ReLU (``activation: gelu`` reproduces
the paper). Dropout, when ``spec.dropout > 0``, follows every hidden activation. The input is
flattened, so the MLP takes images (C, H, W) and tabular feature vectors (d,) alike.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, check_io
from fedsim.models.layers import MaskDropout, make_activation, make_norm
from fedsim.scenario import ModelSpec

HIDDEN_LAYERS = 3
WIDTH_MULTIPLIER = 16


class MLP(nn.Module):
    """flatten -> [Linear -> norm -> act -> dropout] x len(hidden) -> Linear."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in hidden:
            layers += [
                nn.Linear(prev, width, bias=False),
                make_norm(norm, width, dims=1),
                make_activation(activation),
            ]
            if dropout > 0:
                layers.append(MaskDropout(dropout))
            prev = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("mlp")
def build_mlp(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """The DIA MLP: 3 hidden layers of ``16 * width`` units (512 at the default width)."""
    check_io("mlp", input_shape, num_classes, vectors=True)
    return MLP(
        in_features=math.prod(input_shape),
        hidden=[WIDTH_MULTIPLIER * spec.width] * HIDDEN_LAYERS,
        num_classes=num_classes,
        activation=activation_of(spec, "relu"),
        norm=spec.norm,
        dropout=spec.dropout,
    )
