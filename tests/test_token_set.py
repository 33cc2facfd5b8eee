"""Token-set recovery (attacks/token_set.py): the recovered set is compared with ``torch.unique`` of the batch the
client trained on (an independent source), as precision and recall."""

from __future__ import annotations

import pytest
import torch

from fedsim.attacks.token_set import TokenSet
from fedsim.scenario import Budget, Knowledge
from tests.text_updates import text_update

VOCAB, SEQ = 512, 12


def attack() -> TokenSet:
    return TokenSet(TokenSet.Params(), Knowledge(), Budget(iterations=0), torch.device("cpu"), 0)


def batches(count: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (size, SEQ), generator=gen) for _ in range(count)]


def precision_recall(found: torch.Tensor, used: torch.Tensor) -> tuple[float, float]:
    f, u = set(found.tolist()), set(torch.unique(used).tolist())
    hit = len(f & u)
    return (hit / len(f) if f else 0.0), hit / len(u)


@pytest.mark.parametrize("model", ["gpt", "bert"])
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_fedsgd_set_is_exact(model, batch) -> None:
    data = batches(1, batch, seed=batch)
    rec = attack().reconstruct(text_update(model, data, VOCAB, width=64))
    assert rec.failed is None and rec.tokens is None and rec.images is None
    assert rec.token_set.dtype == torch.int64 and rec.token_set.tolist() == sorted(set(rec.token_set.tolist()))
    assert precision_recall(rec.token_set, data[0]) == (1.0, 1.0)
    assert rec.stats["threshold"] == 0.0


def test_gpt_last_position_comes_from_the_head() -> None:
    """Tokens only at position T-1 have a zero embedding row (nothing reads them): the head-bias rule finds them."""
    data = batches(1, 4, seed=5)
    x = data[0]
    only_last = set(x[:, -1].tolist()) - set(x[:, :-1].flatten().tolist())
    assert only_last, "the seed must give a token used only at the last position"
    rec = attack().reconstruct(text_update("gpt", data, VOCAB, width=64))
    assert rec.stats["from_head"] >= len(only_last)
    assert only_last <= set(rec.token_set.tolist())


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_fedavg_several_local_steps_give_the_union(optimizer, momentum, batch) -> None:
    """The union of the local batches' tokens. Adam: the embedding rows (positions 0..T-2) stay exact, but its
    per-coordinate normalization can flip the summed head-bias sign of a last-position-only token (recall then
    misses it; precision stays exact)."""
    data = batches(3, batch, seed=10 + batch)
    upd = text_update("gpt", data, VOCAB, width=64, protocol="fedavg", lr=0.05, optimizer=optimizer,
                      momentum=momentum)
    rec = attack().reconstruct(upd)
    assert rec.failed is None
    if optimizer == "adam":
        assert precision_recall(rec.token_set, torch.cat(data))[0] == 1.0
        assert precision_recall(rec.token_set, torch.cat([x[:, :-1] for x in data]))[1] == 1.0
    else:
        assert precision_recall(rec.token_set, torch.cat(data)) == (1.0, 1.0)


def test_fedavg_weight_decay_fails_with_the_reason() -> None:
    upd = text_update("gpt", batches(2, 4, seed=3), VOCAB, width=64, protocol="fedavg", weight_decay=0.01)
    rec = attack().reconstruct(upd)
    assert rec.failed is not None and "weight decay" in rec.failed and rec.token_set is None


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_dp_noise_collapses_precision(model) -> None:
    """DP-SGD (sigma 1, clip 1, batch 8): every row is noisy; the chi-quantile threshold keeps some rows, and at
    most a sliver of the batch's tokens stand out of the noise."""
    data = batches(1, 8, seed=7)
    rec = attack().reconstruct(text_update(model, data, VOCAB, width=64, dp=(1.0, 1.0)))
    assert rec.failed is None and rec.stats["threshold"] > 0 and rec.stats["rows_nonzero"] == VOCAB
    precision, recall = precision_recall(rec.token_set, data[0])
    assert recall < 0.5 and (precision < 0.5 or len(rec.token_set) <= 3)
