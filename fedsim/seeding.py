"""Every random draw in fedsim is derived from (scenario seed, purpose, round, partition id).

Deriving seeds this way, instead of drawing from one global stream, makes results independent of
how Ray schedules clients: the same scenario and seed give the same numbers on any backend.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the scenario seed and a path of labels, e.g. ``(seed, "batch", rnd, pid)``."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def torch_generator(seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


def seed_everything(seed: int) -> None:
    """Seed the global generators too, for library code that draws from them (e.g. layer init)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
