"""Model surgery shared by model-transforming defenses (MID, dropout) and Soteria.

Defenses only receive the built model, not the scenario, so they locate the classifier generically:
it is the **last** :class:`torch.nn.Linear` in module order. That holds for every registered model
(``convnet``, ``lenet``, ``mlp``, ``resnet`` all end in ``self.classifier = nn.Linear(d, classes)``);
a new architecture whose last Linear is not its output layer should say so in its docstring.
"""

from __future__ import annotations

import hashlib

from torch import Tensor, nn

from fedsim.errors import IncompatibleDefenseError
from fedsim.seeding import derive_seed


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The qualified name and module of the model's classifier: its last ``nn.Linear``."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise IncompatibleDefenseError(f"{type(model).__name__} has no nn.Linear classifier to transform")
    return found[-1]


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` was; returns ``new`` when ``name`` is the root ("")."""
    if not name:
        return new
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def weight_seed(tensor: Tensor, *parts: object) -> int:
    """A seed derived from a tensor's bytes: new layers built by ``transform_model`` get initial weights
    that depend only on the (seeded) model they replace, so the server's global model is reproducible
    even though ``transform_model`` never sees the scenario seed."""
    digest = hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return derive_seed(0, digest, *parts)
