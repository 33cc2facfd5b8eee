"""LeNet(Zhu): the victim network of Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Three 5x5 convolutions with 12 channels, padding 2 and strides 2, 2, 1, each followed by a Sigmoid,
then one Linear layer on the flattened map (768 features for a 32x32 input). The smooth Sigmoid
activations (no pooling) are what make this net easy to invert, which is why DLG chose it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, check_io, flat_size
from fedsim.models.layers import MaskDropout, make_activation, make_norm
from fedsim.scenario import ModelSpec

CHANNELS = 12
STRIDES = (2, 2, 1)


class LeNetZhu(nn.Module):
    """conv(5x5, s2) -> conv(5x5, s2) -> conv(5x5, s1), each norm -> act; then [dropout ->] Linear."""

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        channels: int = CHANNELS,
        activation: str = "sigmoid",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_shape[0]
        for stride in STRIDES:
            layers += [
                nn.Conv2d(prev, channels, kernel_size=5, stride=stride, padding=2),
                make_norm(norm, channels),
                make_activation(activation),
            ]
            prev = channels
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(flat_size("lenet", self.features, input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x)))


def dlg_init_(model: nn.Module, bound: float = 0.5) -> nn.Module:
    """Re-initialize conv and linear weights and biases ~ U(-bound, bound), as the DLG code does."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                for param in module.parameters(recurse=False):
                    param.uniform_(-bound, bound)
    return model


@MODELS.register("lenet")
def build_lenet(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """LeNet(Zhu) with 12 channels (``spec.width`` is not used: the DLG victim has a fixed width)."""
    check_io("lenet", input_shape, num_classes)
    return LeNetZhu(
        input_shape,
        num_classes,
        activation=activation_of(spec, "sigmoid"),
        norm=spec.norm,
        dropout=spec.dropout,
    )
