"""Every random draw in fedsim is derived from (scenario seed, purpose, round, partition id).

Deriving seeds this way, instead of drawing from one global stream, makes results independent of
how Ray schedules clients: the same scenario and seed give the same numbers on any backend.
"""

from __future__ import annotations

import functools
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


def seed_torch(seed: int) -> None:
    """Exactly what ``torch.manual_seed(seed)`` does to every generator, without its ~5 ms when no accelerator
    is up.

    ``torch.manual_seed`` also seeds CUDA; while CUDA is not initialized it queues that call with a formatted
    stack trace (``torch.cuda._lazy_call``), about 5 ms a call, several per client per round. Where no CUDA,
    MPS or XPU device exists, nothing is queued for a device that can never start, so seeding the CPU generator
    alone is the same; an initialized CUDA is seeded directly (what the queued call would run). Otherwise (a
    device exists but is not started yet) it calls ``torch.manual_seed`` itself, queueing included.
    """
    seed = int(seed)
    if torch.cuda.is_initialized() and not _other_accelerator():
        torch.cuda.manual_seed_all(seed)
        torch.default_generator.manual_seed(seed)
    elif _cpu_only():
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@functools.cache
def _other_accelerator() -> bool:
    """Whether an MPS or XPU device (or a registered custom backend) exists, which ``torch.manual_seed`` seeds too."""
    custom = torch._C._get_privateuse1_backend_name() != "privateuseone"
    return bool(torch.backends.mps.is_available() or torch.xpu.is_available() or custom)


@functools.cache
def _cpu_only() -> bool:
    """Whether no device but the CPU can ever be seeded in this process (``torch.manual_seed`` queues none)."""
    return not torch.cuda.is_available() and not _other_accelerator()


def seed_everything(seed: int) -> None:
    """Seed the global generators too, for library code that draws from them (e.g. layer init)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    seed_torch(seed)
