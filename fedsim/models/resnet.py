"""CIFAR-style ResNets with BasicBlocks (He, Zhang, Ren, Sun, CVPR 2016).

Both use the CIFAR stem: one 3x3 conv with stride 1 and no max-pool, so 32x32 inputs keep their
resolution in the first stage.

* ``resnet20``: the paper's CIFAR net, 3 stages of 3 blocks with 16/32/64 channels, scaled by
  ``width / 16`` (``width: 16`` is the original).
* ``resnet18``: 4 stages of 2 blocks with 64/128/256/512 channels, scaled by ``width / 64``
  (``width: 64`` is the usual CIFAR ResNet-18).

Stages after the first halve the resolution; a 1x1 conv (+ norm) projects the shortcut whenever the
shape changes. Global average pooling, optional dropout, then one Linear classifier. The residual
sum is out of place, so the nets support double backward.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, activation_of, check_io
from fedsim.models.layers import MaskDropout, make_activation, make_norm
from fedsim.scenario import ModelSpec


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> act -> conv3x3 -> norm, plus the (projected) input, then act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_ch)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_ch)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), make_norm(norm, out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR stem -> stages of BasicBlocks -> global average pool -> [dropout ->] Linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: list[int],
        blocks: list[int],
        activation: str = "relu",
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=norm == "none"),
            make_norm(norm, channels[0]),
            make_activation(activation),
        )
        stages: list[nn.Module] = []
        prev = channels[0]
        for i, (ch, n) in enumerate(zip(channels, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(prev, ch, stride, norm, activation)]
            stage += [BasicBlock(ch, ch, 1, norm, activation) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            prev = ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.stages(self.stem(x)))))


def _scaled(base: tuple[int, ...], width: int, reference: int) -> list[int]:
    return [max(1, round(c * width / reference)) for c in base]


def _build(
    name: str,
    spec: ModelSpec,
    input_shape: InputShape,
    num_classes: int,
    channels: list[int],
    blocks: list[int],
) -> ResNet:
    check_io(name, input_shape, num_classes)
    return ResNet(
        input_shape[0],
        num_classes,
        channels,
        blocks,
        activation=activation_of(spec, "relu"),
        norm=spec.norm,
        dropout=spec.dropout,
    )


@MODELS.register("resnet20")
def build_resnet20(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-20 for CIFAR: 3 stages x 3 BasicBlocks at 16/32/64 channels x ``width / 16``."""
    channels = _scaled((16, 32, 64), spec.width, 16)
    return _build("resnet20", spec, input_shape, num_classes, channels, [3, 3, 3])


@MODELS.register("resnet18")
def build_resnet18(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-18 with a CIFAR stem: 4 stages x 2 BasicBlocks at 64/128/256/512 channels x ``width / 64``."""
    channels = _scaled((64, 128, 256, 512), spec.width, 64)
    return _build("resnet18", spec, input_shape, num_classes, channels, [2, 2, 2, 2])
