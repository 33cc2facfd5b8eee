"""Generative image priors trained by fedsim itself (``fedsim prior train``) for GAN-prior attacks."""

from fedsim.priors.generator import DCGANDiscriminator, DCGANGenerator, from_pixels, to_pixels
from fedsim.priors.store import Prior, PriorMeta, build_prior, load_prior, resolve_prior_path, save_prior

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Prior",
    "PriorMeta",
    "build_prior",
    "from_pixels",
    "load_prior",
    "resolve_prior_path",
    "save_prior",
    "to_pixels",
]
