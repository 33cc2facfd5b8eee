"""Torch state dicts to and from Flower ArrayRecords, byte for byte as Flower does it, without its per-array cost.

Flower stores each array as the bytes ``np.save`` writes (a ``.npy`` header, then the data) and reads it back with
``np.load``, which parses the header with ``ast.literal_eval`` every time: about a third of a small model's
per-client message cost (benchmarks/vs_pfl.py). A model's headers repeat every round, so here each distinct header
is parsed (or written) once and cached; the data is copied as ``np.save`` / ``np.load`` copy it. :func:`to_record`
gives the same ``Array`` fields (dtype, shape, stype, bytes) as ``ArrayRecord(state_dict)``; :func:`to_state` the
same tensors as ``ArrayRecord.to_torch_state_dict()`` (writable copies; Flower's are views of a private bytes
copy); :func:`weighted_mean` the same record as Flower's ``aggregate_arrayrecords`` (same float operations in the
same order). tests/test_records.py checks all three against Flower's own functions.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

NUMPY_STYPE = "numpy.ndarray"  # flwr.app's SType.NUMPY
_MAGIC = b"\x93NUMPY"


def from_numpy(array: np.ndarray) -> Array:
    """``Array(array)`` (Flower's ``np.save`` bytes), with the header written once per (dtype, shape, order).

    Only plain dtypes are cached: for those ``dtype.str`` is exactly the ``descr`` ``np.save`` writes. A structured
    dtype's ``str`` is just ``'|V<itemsize>'`` (two different records can share it) and a dtype with metadata
    makes ``np.save`` warn, so those are written by ``np.save`` itself every time, as Flower does."""
    shape = tuple(int(d) for d in array.shape)
    if array.dtype.names is not None or array.dtype.metadata is not None:
        data = _npy_bytes(array)
    else:
        fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)  # as np.save decides
        data = _header(array.dtype.str, shape, fortran, array) + array.tobytes(order="F" if fortran else "C")
    return Array(dtype=str(array.dtype), shape=shape, stype=NUMPY_STYPE, data=data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _header(dtype: str, shape: tuple[int, ...], fortran: bool, array: np.ndarray) -> bytes:
    """The ``.npy`` header of a plain-dtype array (``dtype`` is its ``dtype.str``), cached per (dtype, shape, order)."""
    key = (dtype, shape, fortran)
    prefix = _HEADERS.get(key)
    if prefix is None:
        written = _npy_bytes(array)
        prefix = written[: len(written) - array.nbytes]
        if len(_HEADERS) < 4096:
            _HEADERS[key] = prefix
    return prefix


_HEADERS: dict[tuple[str, tuple[int, ...], bool], bytes] = {}


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state)`` for a torch state dict (tensors detached and moved to the CPU, as Flower does)."""
    record = ArrayRecord()
    for key, tensor in state.items():
        record[key] = from_numpy(tensor.detach().cpu().numpy())
    return record


def to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` as a writable copy; the header parsed once per distinct header. Raises TypeError for a
    non-NumPy serialization, ValueError for bytes that are not ``.npy``."""
    if array.stype != NUMPY_STYPE:
        raise TypeError(f"Unsupported serialization type for numpy conversion: '{array.stype}'")
    data = array.data
    if data[:6] != _MAGIC or data[6] not in (1, 2):
        # another .npy version: NumPy's own reader, copied (writable)
        return np.array(np.load(io.BytesIO(data), allow_pickle=False))
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran = _parse_header(data[:end])
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    out = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
    return out.copy(order="K")


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return dtype, tuple(shape), bool(fortran)


def to_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``: name -> CPU tensor, in the record's order."""
    return OrderedDict((key, torch.from_numpy(to_numpy(array))) for key, array in record.items())


def weighted_mean(records: Sequence[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords``: each array record of each reply times w / sum(w) (w read from the
    reply's first metric record under ``weighting_metric_name``), summed in reply order, in NumPy."""
    weights = [float(next(iter(r.metric_records.values()))[weighting_metric_name]) for r in records]
    total = sum(weights)
    factors = [w / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for record, factor in zip(records, factors, strict=True):
        for item in record.array_records.values():
            for key, value in item.items():
                if key not in out:
                    out[key] = to_numpy(value) * factor
                else:
                    out[key] += to_numpy(value) * factor
    mean = ArrayRecord()
    for key, value in out.items():
        mean[key] = from_numpy(np.asarray(value))
    return mean


@contextmanager
def flower_arrays_cached() -> Iterator[None]:
    """Within the block, Flower's own ``Array.numpy()`` and ``Array(ndarray)`` use :func:`to_numpy` and
    :func:`from_numpy` (same values, same bytes; headers cached), for Flower code fedsim calls but does not own,
    e.g. the central-DP wrappers' clipping and noising (``flwr.serverapp.strategy.dp_*``), which convert every
    reply's arrays twice per round.

    The patch is on Flower's class, so process-wide: the first block to enter (in any thread) patches, the last to
    leave restores Flower's own methods; blocks may nest or overlap across threads in any order. While any block is
    open, other threads' conversions use fedsim's too (same bytes and values, so nothing they compute changes)."""
    global _patch_depth, _patch_saved
    with _PATCH_LOCK:
        if _patch_depth == 0:
            _patch_saved = Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"]
            Array.numpy = to_numpy  # type: ignore[method-assign]
            Array.from_numpy_ndarray = classmethod(lambda cls, ndarray: from_numpy(ndarray))  # type: ignore
        _patch_depth += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _patch_depth -= 1
            if _patch_depth == 0 and _patch_saved is not None:
                Array.numpy, Array.from_numpy_ndarray = _patch_saved  # type: ignore[method-assign]
                _patch_saved = None


_PATCH_LOCK = threading.Lock()
_patch_depth = 0  # open flower_arrays_cached blocks, all threads together
_patch_saved: tuple[object, object] | None = None  # Flower's own methods while patched
