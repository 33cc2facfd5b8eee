"""Dropout as a defense: the client trains with random dropout masks, so its gradient is that of a
randomly thinned network which the server does not know. Scheliga, Mäder, Seeland (AAAI 2023,
"Dropout is NOT All You Need to Prevent Gradient Leakage") show that this stops Inverting Gradients
(which inverts the deterministic network) but *not* their Dropout Inversion Attack, which optimizes the
masks jointly with the images. This plug-in exists to reproduce that finding.

``transform_model`` (stage 10):

* every :class:`~fedsim.models.MaskDropout` the model already has (``model.dropout > 0``, e.g. after each
  hidden layer of the ``mlp``) gets probability ``p``;
* a model without any gets one ``MaskDropout(p)`` in front of its classifier (the last ``nn.Linear``,
  see :mod:`fedsim.defenses.model_surgery`): the classifier becomes ``Sequential(dropout=..., linear=...)``,
  so its parameters are named ``<classifier>.linear.weight`` / ``.bias`` and the dropout layer
  ``<classifier>.dropout``.

Masks are drawn from the global torch RNG, which the client seeds per (seed, round, partition) before
training; when the server captures an update the client records them, so the ground truth holds
``mask/<layer name>`` (fedsgd; ``mask/step<i>/<layer name>`` for fedavg), 0/1 tensors of the
activation's shape. The server evaluates in eval mode, where dropout is the identity.
"""

from __future__ import annotations

from collections import OrderedDict

from pydantic import Field
from torch import nn

from fedsim.defenses.base import Defense, DefenseParams, register_defense
from fedsim.defenses.model_surgery import last_linear, replace_submodule
from fedsim.models import MaskDropout, dropout_layers


class DropoutParams(DefenseParams):
    p: float = Field(0.25, gt=0, lt=1, description="dropout probability (DIA's MLP uses 0.25)")


@register_defense("dropout")
class Dropout(Defense):
    Params = DropoutParams
    stage = 10
    summary = "trains with random dropout masks (Scheliga et al. 2023 show it is not a defense)"
    model_params = ("p",)

    def transform_model(self, model: nn.Module) -> nn.Module:
        existing = dropout_layers(model)
        for layer in existing.values():
            layer.p = float(self.params.p)
        if existing:
            return model
        name, fc = last_linear(model)
        layer = MaskDropout(self.params.p).train(fc.training)
        return replace_submodule(model, name, nn.Sequential(OrderedDict(dropout=layer, linear=fc)))
