"""Save and load a trained prior: one ``.pt`` file holding the generator, the discriminator and metadata.

Loading always uses ``torch.load(weights_only=True)``: a prior file holds only tensors and plain
values, so a malicious file cannot run code. Priors shipped with fedsim live in ``assets/`` and are
referred to by name (``mnist-dcgan``); anything else is a path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsim.errors import DataUnavailableError, FedsimError
from fedsim.outputs import write_atomic
from fedsim.priors.generator import DCGANDiscriminator, DCGANGenerator

ASSETS = Path(__file__).parent / "assets"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PriorMeta:
    """What a prior was trained on and how to use it."""

    dataset: str  # auxiliary data it learned from (never the clients' partitions)
    resolution: int
    channels: int
    latent_dim: int
    width: int
    normalization: str = "tanh"  # generator output in [-1, 1]; pixels = (x + 1) / 2
    steps: int = 0  # optimiser steps taken so far
    seconds: float = 0.0  # training wall time so far
    data_note: str = ""  # e.g. "mnist-5k train examples 2000..3999 (disjoint from the clients' first 2000)"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prior:
    generator: DCGANGenerator
    discriminator: DCGANDiscriminator
    meta: PriorMeta


def build_prior(meta: PriorMeta) -> Prior:
    gen = DCGANGenerator(meta.latent_dim, meta.channels, meta.resolution, meta.width)
    disc = DCGANDiscriminator(meta.channels, meta.resolution, meta.width)
    return Prior(gen, disc, meta)


def save_prior(path: str | Path, prior: Prior, extra_state: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a prior. Replaces ``path``:
    callers first check with :func:`check_prior_target` that it is absent or a fedsim prior."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "meta": asdict(prior.meta),
        "generator": prior.generator.state_dict(),
        "discriminator": prior.discriminator.state_dict(),
        **(extra_state or {}),
    }
    # a new, exclusively created temp name (two trainings never share one, no other file is truncated);
    # fsync'd before the rename makes it visible. Callers check that ``path`` may be replaced.
    return write_atomic(path, lambda fh: torch.save(payload, fh))


def is_prior_file(path: str | Path) -> bool:
    """Whether ``path`` is a file fedsim wrote as a prior or a training checkpoint (format field checked)."""
    try:
        read_prior_file(path)
    except DataUnavailableError:
        return False
    return True


def check_prior_target(path: str | Path, field: str) -> None:
    """Refuse (FedsimError at ``field``) to overwrite a file that is not a fedsim prior; nothing is touched."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and (not path.is_file() or path.is_symlink() or not is_prior_file(path)):
        raise FedsimError(f"{field}: {path} exists and is not a fedsim prior file; fedsim does not overwrite what "
                          "it did not create: choose another path")


def resolve_prior_path(name_or_path: str | Path) -> Path:
    """A shipped prior's name (``mnist-dcgan``) or a file path -> an existing file, or a clear error."""
    text = str(name_or_path)
    shipped = ASSETS / f"{text}.pt"
    if "/" not in text and not text.endswith(".pt") and shipped.is_file():
        return shipped
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = ", ".join(sorted(p.stem for p in ASSETS.glob("*.pt"))) or "none"
    raise DataUnavailableError(
        f"prior {text!r} not found: give a file written by `fedsim prior train` or a shipped prior ({names})")


def read_prior_file(path: str | Path) -> dict[str, Any]:
    """The raw payload (state dicts, metadata and any training state), loaded with weights_only=True."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's data problem
        raise DataUnavailableError(f"{path} is not a readable prior file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise DataUnavailableError(f"{path} is not a fedsim prior (format {FORMAT_VERSION})")
    return payload


def load_prior(name_or_path: str | Path, device: torch.device | str = "cpu") -> Prior:
    """Load a prior for attacking: generator and discriminator in eval mode, gradients off."""
    path = resolve_prior_path(name_or_path)
    payload = read_prior_file(path)
    try:
        prior = build_prior(PriorMeta(**payload["meta"]))
        prior.generator.load_state_dict(payload["generator"])
        prior.discriminator.load_state_dict(payload["discriminator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # missing/extra fields, wrong shapes
        raise DataUnavailableError(f"{path} is not a valid prior: {type(err).__name__}: {err}") from None
    for net in (prior.generator, prior.discriminator):
        net.to(device).eval().requires_grad_(False)
    return prior
