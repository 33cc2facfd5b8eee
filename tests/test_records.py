"""fedsim's cached ArrayRecord conversion (fedsim.simulation.records) gives exactly what Flower's own does."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.simulation import records
from fedsim.simulation.records import to_record, to_state, weighted_mean


def _states() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = {
        "conv": torch.randn(4, 3, 2, 2, generator=gen),
        "fortran": torch.randn(5, 3, generator=gen).t(),  # F-contiguous: np.save writes fortran_order
        "strided": torch.randn(6, 4, generator=gen)[::2],  # neither C nor F contiguous
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "counter": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(3, generator=gen).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
    }
    return [{k: v * (i + 1) if v.dtype != torch.bool else v for k, v in base.items()} for i in range(3)]


def test_encode_decode_match_flower_bytes_and_values() -> None:
    for state in _states():
        for _ in range(2):  # the second pass reads the cached headers
            ours, flowers = to_record(state), ArrayRecord(state)
            assert list(ours.keys()) == list(flowers.keys())
            for key in state:
                a, b = ours[key], flowers[key]
                assert (a.dtype, a.shape, a.stype, a.data) == (b.dtype, b.shape, b.stype, b.data), key
            got, want = to_state(flowers), flowers.to_torch_state_dict()
            for key in state:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
                assert torch.equal(got[key], want[key]), key


def test_weighted_mean_matches_flower_aggregation() -> None:
    replies = []
    for i, state in enumerate(_states()):
        kept = {k: v for k, v in state.items() if v.dtype != torch.bool}
        replies.append(RecordDict({"arrays": ArrayRecord(kept), "metrics": MetricRecord({"w": 10 + 7 * i})}))
    ours, flowers = weighted_mean(replies, "w"), aggregate_arrayrecords(replies, "w")
    assert list(ours.keys()) == list(flowers.keys())
    for key in flowers:
        a, b = ours[key], flowers[key]
        assert (a.dtype, a.shape, a.data) == (b.dtype, b.shape, b.data), key
    assert np.array_equal(ours["conv"].numpy(), flowers["conv"].numpy())


def test_flower_arrays_cached_is_flowers_conversion_and_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the block Flower's Array goes through fedsim's conversion (counted by a spy, so a patch that never
    applies fails here), gives Flower's own bytes and values, and after it Flower's methods are back."""
    calls = {"to_numpy": 0, "from_numpy": 0}

    def spy(name: str):
        real = getattr(records, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(records, "to_numpy", spy("to_numpy"))
    monkeypatch.setattr(records, "from_numpy", spy("from_numpy"))
    numpy_before, from_before = Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"]
    arrays = [v.numpy() for v in _states()[1].values()]
    plain = [Array(a) for a in arrays]
    assert calls == {"to_numpy": 0, "from_numpy": 0}
    with records.flower_arrays_cached():
        cached = [Array(a) for a in arrays]
        read = [b.numpy() for b in plain]
    assert calls == {"to_numpy": len(arrays), "from_numpy": len(arrays)}
    for a, p, c, r in zip(arrays, plain, cached, read, strict=True):
        assert (p.dtype, p.shape, p.stype, p.data) == (c.dtype, c.shape, c.stype, c.data)
        assert r.dtype == a.dtype and np.array_equal(r, a)
    assert Array.__dict__["numpy"] is numpy_before and Array.__dict__["from_numpy_ndarray"] is from_before
    Array(arrays[0]).numpy()
    assert calls == {"to_numpy": len(arrays), "from_numpy": len(arrays)}  # nothing goes through fedsim after it


def test_flower_arrays_cached_restores_flower_when_threads_interleave() -> None:
    """Thread A enters, B enters, A leaves, B leaves (not nested): Flower's own methods must be back afterwards,
    and stay patched while B is still inside."""
    originals = Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"]
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def thread_a() -> None:
        try:
            with records.flower_arrays_cached():
                a_in.set()
                assert b_in.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            a_out.set()

    def thread_b() -> None:
        try:
            assert a_in.wait(10)
            with records.flower_arrays_cached():
                b_in.set()
                assert a_out.wait(10)
                seen["numpy_after_a"] = Array.__dict__["numpy"]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    after = Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"]
    Array.numpy, Array.from_numpy_ndarray = originals  # never leave Flower patched for the tests that follow
    assert not errors and not any(t.is_alive() for t in threads)
    assert seen["numpy_after_a"] is not originals[0]  # B still inside: still fedsim's conversion
    assert after[0] is originals[0] and after[1] is originals[1]


def test_structured_dtypes_of_equal_itemsize_get_their_own_header() -> None:
    """Two structured dtypes share dtype.str ('|V8'); each must still get the bytes Flower's Array(ndarray) writes
    (np.save), and read back to Flower's values."""
    first = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])
    first["a"], first["b"] = [1.5, 2.5, 3.5], [1, 2, 3]
    second = np.zeros(3, dtype=[("x", "<i8")])
    second["x"] = [7, 8, 9]
    assert first.dtype.str == second.dtype.str  # what made them collide
    for array in (first, second, first):
        ours, flowers = records.from_numpy(array), Array(array)
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                                   flowers.data)
        back = records.to_numpy(flowers)
        assert back.dtype == array.dtype and np.array_equal(back, flowers.numpy())
