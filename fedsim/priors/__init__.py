"""Generative image priors trained by fedsim itself (``fedsim prior train``) for GAN-prior attacks.

Names are imported lazily (PEP 562) so that ``fedsim --help`` does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DCGANDiscriminator": "fedsim.priors.generator",
    "DCGANGenerator": "fedsim.priors.generator",
    "from_pixels": "fedsim.priors.generator",
    "to_pixels": "fedsim.priors.generator",
    "Prior": "fedsim.priors.store",
    "PriorMeta": "fedsim.priors.store",
    "build_prior": "fedsim.priors.store",
    "load_prior": "fedsim.priors.store",
    "resolve_prior_path": "fedsim.priors.store",
    "save_prior": "fedsim.priors.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsim.priors' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
