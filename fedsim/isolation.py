"""Process-wide state a call may change only for its own duration: the global RNGs and torch's threads.

fedsim derives every draw it makes itself from (seed, purpose, ...) (:mod:`fedsim.seeding`). Some
draws happen inside library or model code that reads the *global* generators (a stochastic layer's
``torch.randn_like``, a dropout mask); those run inside :func:`seeded_global_rngs`, which seeds the
global generators for the call and gives the caller its own state back afterwards. Neither the call's
result nor anything that runs later in the process then depends on what ran before it.

torch's thread count changes float summation order, and an optimisation that runs thousands of steps
amplifies that into a different result (a GIFD reconstruction: 27.1 dB with one thread, 24.5 dB with
two). A command that sets it for itself uses :func:`torch_threads`, so a caller in the same process
(a test, a notebook, a serial bench) keeps its own count.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])
_DEPTH = threading.local()


def _cuda_devices(device: torch.device | str | None) -> list[int]:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def seeded_global_rngs(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's CPU generator (and ``device``'s, if CUDA), NumPy's and Python's global generators
    with ``seed`` for the block; restore all of them afterwards, also on an exception.

    torch is seeded exactly as ``torch.manual_seed(seed)`` seeds the CPU and that device, so code that
    did the latter inside ``torch.random.fork_rng`` draws the same numbers. Other CUDA devices are left
    alone (``torch.manual_seed`` would reseed them all and never give them back).
    """
    devices = _cuda_devices(device)
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def isolated_global_rngs(fn: F) -> F:
    """Decorate ``fn`` so any global-RNG draw or reseeding inside it (torch CPU, NumPy, Python) is
    undone when it returns: the caller's generators are as they were before the call."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        np_state, py_state = np.random.get_state(), random.getstate()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            try:
                return fn(*args, **kwargs)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)

    return wrapper  # type: ignore[return-value]


def seeded_method(fn: F) -> F:
    """Decorate a method of an object with ``seed`` and ``device`` attributes (an attack): the outermost
    call runs inside :func:`seeded_global_rngs` (``self.seed``, ``self.device``), so calling it twice on
    the same input gives the same result whatever ran in between. Nested calls (``super()``) do not
    reseed."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_DEPTH, "value", 0)
        if depth:
            return fn(self, *args, **kwargs)
        _DEPTH.value = 1
        try:
            with seeded_global_rngs(int(self.seed), getattr(self, "device", None)):
                return fn(self, *args, **kwargs)
        finally:
            _DEPTH.value = 0

    wrapper.__seeded__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (at least 1) and restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def command_threads(count: int) -> None:
    """``torch.set_num_threads(count)`` (at least 1) for the running CLI command only: the caller's count
    comes back when the command's click context closes (a test invoking the CLI in-process, a notebook),
    instead of leaking into whatever runs next in the process."""
    import click

    before = torch.get_num_threads()
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: torch.set_num_threads(before))
    torch.set_num_threads(max(1, int(count)))
