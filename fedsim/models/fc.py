"""``fc10``: the ``FC_10`` network of DIFF2's regression experiments (Murata & Suzuki, ICML 2023; the
authors' ``src/models.py`` at lawrenceztang/CE-PLSGM@4b4d60a; spec ``algorithms-more.md`` §9.7).

``Linear(d, 10) -> softplus -> Linear(10, outputs)``, with every weight drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` as the authors set explicitly (PyTorch's default for
``nn.Linear`` draws from the same law); biases keep PyTorch's default, also ``U(+-1/sqrt(fan_in))``.

* The hidden layer has 10 units by definition: ``model.width`` does not apply to ``fc10`` (use ``mlp``
  for a wider network).
* Inputs are flattened, so ``fc10`` takes feature vectors (d,) (its purpose: one output for a regression
  task) and images (C, H, W) alike (one logit per class for a classification task).
* ``model.activation`` replaces softplus when set; ``model.norm`` and ``model.dropout`` add a norm layer
  after the hidden Linear and a :class:`~fedsim.models.MaskDropout` after the activation, as in ``mlp``.
  With the defaults (no norm, no dropout) the network is exactly ``FC_10``.
* The output layer is the model's last ``nn.Linear`` (``classifier``), as model-shaping defenses expect.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from fedsim.models.base import MODELS, InputShape, check_io
from fedsim.models.layers import MaskDropout, make_activation, make_norm
from fedsim.scenario import ModelSpec

HIDDEN_UNITS = 10


def uniform_fan_in_(layer: nn.Linear) -> nn.Linear:
    """Draw ``layer.weight`` from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` in place (the authors' init)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    return layer


class FC10(nn.Module):
    """flatten -> Linear(d, 10) -> [norm] -> softplus -> [dropout] -> Linear(10, outputs)."""

    def __init__(self, in_features: int, outputs: int, activation: str | None = None, norm: str = "none",
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Flatten(),
            uniform_fan_in_(nn.Linear(in_features, HIDDEN_UNITS)),
            make_norm(norm, HIDDEN_UNITS, dims=1),
            nn.Softplus() if activation is None else make_activation(activation),
        ]
        if dropout > 0:
            layers.append(MaskDropout(dropout))
        self.features = nn.Sequential(*layers)
        self.classifier = uniform_fan_in_(nn.Linear(HIDDEN_UNITS, outputs))

    def forward(self, x: Tensor) -> Tensor:
        """(N, d) or (N, C, H, W) -> (N, outputs)."""
        return self.classifier(self.features(x))


@MODELS.register("fc10")
def build_fc10(spec: ModelSpec, input_shape: InputShape, outputs: int) -> nn.Module:
    """FC_10 for ``input_shape`` (d,) or (C, H, W) and ``outputs`` (1 for a regression, else the classes)."""
    check_io("fc10", input_shape, outputs, vectors=True)
    return FC10(math.prod(input_shape), outputs, activation=spec.activation, norm=spec.norm, dropout=spec.dropout)
