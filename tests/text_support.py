"""A tiny text dataset for tests that need no corpus: ``tiny-text`` (language modeling) and ``tiny-text-cls``
(classification), registered on import. Token ids are seeded random draws from a small vocabulary with a
repeated motif (so a model has something to learn), 4 sources dealt by ``groups``; ``tokenizer`` is empty
(reports then show token ids, see :func:`fedsim.report.text.token_strings`)."""

from __future__ import annotations

import torch

from fedsim.data.bundle import DatasetBundle
from fedsim.data.catalog import DATASETS, DatasetFacts, declare_facts
from fedsim.data.sources import NativeSplits, declare_source
from fedsim.scenario import DataSpec

VOCAB = 40
SEQ_LEN = 8


def _tokens(n: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=gen)


def _bundle(spec: DataSpec, task: str) -> DatasetBundle:
    seq_len = spec.seq_len or SEQ_LEN
    train_x, test_x = _tokens(64, seq_len, 1), _tokens(16, seq_len, 2)
    if task == "language_modeling":
        train_y, test_y, classes = train_x.clone(), test_x.clone(), VOCAB
    else:
        train_y, test_y, classes = train_x[:, 0] % 3, test_x[:, 0] % 3, 3
    return DatasetBundle(name=spec.dataset, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                         num_classes=classes, mean=(), std=(), attribution="random token ids (tests)", task=task,
                         vocab_size=VOCAB, tokenizer="", groups=torch.arange(64) % 4,
                         source_names=("a", "b", "c", "d"))


if "tiny-text" not in DATASETS:
    DATASETS.register("tiny-text")(lambda spec: _bundle(spec, "language_modeling"))
    DATASETS.register("tiny-text-cls")(lambda spec: _bundle(spec, "classification"))
    declare_facts("tiny-text", DatasetFacts(task="language_modeling", inputs="tokens", seq_len=SEQ_LEN))
    declare_facts("tiny-text-cls", DatasetFacts(task="classification", inputs="tokens", seq_len=SEQ_LEN))
    # train and test are separate seeded draws: the collection's own splits (every dataset declares a source)
    declare_source("tiny-text", NativeSplits("tiny-text-random"))
    declare_source("tiny-text-cls", NativeSplits("tiny-text-random"))


def tiny_text(model: str = "gpt", **extra: object) -> dict:
    """A raw scenario: ``model`` (gpt on tiny-text, bert on tiny-text-cls), 2 clients, 1 fedsgd round."""
    dataset = "tiny-text" if model == "gpt" else "tiny-text-cls"
    raw = {"name": "tinytext", "seed": 3, "device": "cpu",
           "data": {"dataset": dataset, "partition": {"kind": "iid"}},
           "model": {"name": model, "width": 16, "depth": 1},
           "federation": {"clients": 2, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 2, "lr": 0.1}},
           "backend": {"kind": "inprocess"}, "evaluation": {"batch_size": 16}}
    raw.update(extra)
    return raw
