"""A small 3-conv ConvNet, the kind of CIFAR victim used by Inverting Gradients (Geiping et al. 2020).

Each stage is ``conv 3x3 (pad 1) -> norm -> act -> maxpool 2`` with widths w, 2w, 4w; the last map
is flattened into one Linear classifier (4w * 4 * 4 features for a 32x32 input). Pooling after every
conv keeps it cheap on CPU (about 10 M multiply-adds per 32x32 image at w = 32), so attacks that run
thousands of double-backward steps stay fast. Inputs need at least 8x8 pixels.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, check_io, check_min_size, flat_size
from fedsim.models.layers import MaskDropout, make_activation, make_norm
from fedsim.scenario import ModelSpec

STAGE_MULTIPLIERS = (1, 2, 4)
MIN_SIZE = 2 ** len(STAGE_MULTIPLIERS)


class ConvNet(nn.Module):
    """[conv -> norm -> act -> maxpool] x 3 -> flatten -> [dropout ->] Linear."""

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        width: int = 32,
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_shape[0]
        for mult in STAGE_MULTIPLIERS:
            out = width * mult
            layers += [
                nn.Conv2d(prev, out, kernel_size=3, padding=1, bias=norm == "none"),
                make_norm(norm, out),
                make_activation(activation),
                nn.MaxPool2d(2),
            ]
            prev = out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(flat_size("convnet", self.features, input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x)))


@MODELS.register("convnet")
def build_convnet(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """The 3-stage ConvNet with base width ``spec.width`` (ReLU unless overridden)."""
    check_io("convnet", input_shape, num_classes)
    check_min_size("convnet", input_shape, MIN_SIZE)
    return ConvNet(
        input_shape,
        num_classes,
        width=spec.width,
        activation=activation_of(spec, "relu"),
        norm=spec.norm,
        dropout=spec.dropout,
    )
