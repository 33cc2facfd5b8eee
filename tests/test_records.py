"""fedsim's cached ArrayRecord conversion (fedsim.simulation.records) gives exactly what Flower's own does."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

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


def test_flower_arrays_cached_is_flowers_conversion_and_is_restored() -> None:
    from flwr.app import Array

    from fedsim.simulation.records import flower_arrays_cached

    numpy_before, from_before = Array.__dict__["numpy"], Array.__dict__["from_numpy_ndarray"]
    arrays = [v.numpy() for v in _states()[1].values()]
    plain = [Array(a) for a in arrays]
    with flower_arrays_cached():
        cached = [Array(a) for a in arrays]
        read = [b.numpy() for b in plain]
    for a, p, c, r in zip(arrays, plain, cached, read, strict=True):
        assert (p.dtype, p.shape, p.stype, p.data) == (c.dtype, c.shape, c.stype, c.data)
        assert r.dtype == a.dtype and np.array_equal(r, a)
    assert Array.__dict__["numpy"] is numpy_before and Array.__dict__["from_numpy_ndarray"] is from_before
