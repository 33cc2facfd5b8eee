"""``wikitext-2``: WikiText-2 (raw, v1; Merity, Xiong, Bradbury and Socher, 2016; CC BY-SA 3.0) as token ids.

The normal path for users with a network: with ``data.download: true`` the loader fetches Hugging Face's
``Salesforce/wikitext`` (config ``wikitext-2-raw-v1``) with ``datasets.load_dataset`` and saves it under
``data.root`` (default ``~/.fedsim/data``) as ``wikitext-2-raw-v1/`` (``Dataset.save_to_disk``); later runs, and
every run with ``download: false``, read that folder only (``load_from_disk``: no network). When it is absent and
may not be downloaded, or the download fails, the loader raises ONE
:class:`~fedsim.errors.DataUnavailableError` saying how to get it.

Examples: the text is tokenized with ``kjv-bpe-2048`` (byte-level, so any text encodes; being trained on the
KJV, it spends more tokens per word on modern English) ARTICLE BY ARTICLE (an article starts at a ``" = Title = "``
line), and each article's ids are cut into consecutive T-token examples (T = ``data.seq_len``, default 16; an
article's last < T ids are dropped; no example crosses two articles). Train examples come from the ``train``
split, test examples from the ``test`` split (``data.test_fraction`` does not apply), in article order; a test
chunk whose T ids equal a train chunk's is dropped (:mod:`fedsim.data.dedup`: no example in both parts).
``groups`` is the train example's article (``source_names`` its title), for ``partition.kind: by_source``.
Tokenizing the ~2 M-word train split takes seconds. WikiText-2 has no public part (``model.pretrain`` is refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.data.bundle import DatasetBundle
from fedsim.data.catalog import DATASETS, DatasetFacts, declare_facts
from fedsim.data.dedup import rows_not_in
from fedsim.data.sources import Examples, declare_source
from fedsim.data.text import DEFAULT_SEQ_LEN, PARTS, TOKENIZER, TOKENIZER_OF, seq_len_of
from fedsim.data.torchvision_sets import data_root
from fedsim.errors import DataUnavailableError
from fedsim.text.tokenizer import encode_batch, vocab_size

if TYPE_CHECKING:
    from fedsim.scenario import DataSpec

NAME = "wikitext-2"
HF_PATH, HF_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
FOLDER = HF_CONFIG  # under data.root, written by Dataset.save_to_disk
ATTRIBUTION = "WikiText-2 raw v1 (Merity, Xiong, Bradbury and Socher, 2016), CC BY-SA 3.0, via Hugging Face"
_TITLE = re.compile(r"^ = ([^=].*) = $")


def articles(lines: list[str]) -> tuple[list[str], list[str]]:
    """(titles, texts) of the articles in WikiText's ``text`` lines (a ``" = Title = "`` line starts one; lines
    before the first title, if any, form an untitled article)."""
    titles: list[str] = []
    bodies: list[list[str]] = []
    for line in lines:
        match = _TITLE.match(line.rstrip("\n"))
        if match is not None or not bodies:
            titles.append(match.group(1).strip() if match is not None else "(untitled)")
            bodies.append([])
        bodies[-1].append(line)
    return titles, ["".join(body) for body in bodies]


def chunks(texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, T) int64, article (N,) int64): each text's ids cut into consecutive ``seq_len``-id pieces."""
    rows, owner = [], []
    for i, ids in enumerate(encode_batch(TOKENIZER, texts)):
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            rows.append(ids[start:start + seq_len])
            owner.append(i)
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), seq_len), np.asarray(owner, dtype=np.int64)


FIELD = "data.dataset"  # the field an absent or unfetchable WikiText-2 is reported at


def _missing(folder: Path) -> str:
    return (f"{FIELD}: dataset 'wikitext-2' not found in {folder}: set data.download: true (needs network) to fetch "
            f"Hugging Face's {HF_PATH} ({HF_CONFIG}) there, or copy that folder (written by datasets' "
            "save_to_disk) from a machine that has it; set data.root to use another folder, or use dataset: kjv "
            "(bundled, offline)")


def _download(folder: Path) -> None:
    """Fetch WikiText-2 with ``datasets`` into ``folder`` (its download cache next to it)."""
    try:
        import datasets

        dd = datasets.load_dataset(HF_PATH, HF_CONFIG, cache_dir=str(folder.parent / "hf-cache"))
        dd.save_to_disk(str(folder))
    except Exception as err:  # noqa: BLE001  (network, hub and file errors all become one line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataUnavailableError(f"{FIELD}: dataset 'wikitext-2': downloading {HF_PATH} ({HF_CONFIG}) into "
                                   f"{folder} failed: {first}; check the network, or put the saved dataset (datasets' "
                                   f"save_to_disk) under data.root as {folder}, or use dataset: kjv (bundled, "
                                   "offline)") from None


def _read(folder: Path) -> dict[str, list[str]]:
    """The ``text`` lines of the train and test splits saved in ``folder``."""
    try:
        from datasets import load_from_disk

        dd = load_from_disk(str(folder))
        return {split: list(dd[split]["text"]) for split in ("train", "test")}
    except Exception as err:  # noqa: BLE001  (a half-copied or foreign folder)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataUnavailableError(f"dataset 'wikitext-2': {folder} cannot be read ({first}); delete it and set "
                                   "data.download: true to fetch it again") from None


def load_wikitext2(spec: DataSpec) -> DatasetBundle:
    """WikiText-2 as T-token examples (module docstring). Raises DataUnavailableError (one line) when it is
    not under ``data.root`` and may not be downloaded, or the download fails. Never touches the network with
    ``data.download: false``."""
    folder = data_root(spec) / FOLDER
    if not (folder / "dataset_dict.json").is_file():
        if not spec.download:
            raise DataUnavailableError(_missing(folder))
        _download(folder)
    lines = _read(folder)
    seq_len = seq_len_of(spec)
    titles, texts = articles(lines["train"])
    train_x, owner = chunks(texts, seq_len)
    test_x, _ = chunks(articles(lines["test"])[1], seq_len)
    test_x = test_x[rows_not_in(test_x, train_x)]  # no test example equals a train example
    train, test = torch.from_numpy(train_x), torch.from_numpy(test_x)
    vocab = vocab_size(TOKENIZER)
    return DatasetBundle(name=NAME, train_x=train, train_y=train.clone(), test_x=test, test_y=test.clone(),
                         num_classes=vocab, mean=(), std=(), attribution=ATTRIBUTION, task="language_modeling",
                         vocab_size=vocab, tokenizer=TOKENIZER, groups=torch.from_numpy(owner),
                         source_names=tuple(titles))


@dataclass(frozen=True)
class _Chunks:
    """Source of ``wikitext-2``: position p of a split is chunk p of that split (chunks depend on T; the test
    split counts only the chunks equal to no train chunk)."""

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        what = f"{dataset} {split} examples {start}..{'end' if stop is None else stop - 1}"
        return Examples(f"WikiText-2 ({seq_len_of(spec)}-token chunks)", split, (start, stop), what)


DATASETS.add(NAME, load_wikitext2)
declare_facts(NAME, DatasetFacts(task="language_modeling", inputs="tokens", seq_len=DEFAULT_SEQ_LEN))
declare_source(NAME, _Chunks())
TOKENIZER_OF[NAME] = TOKENIZER
PARTS[NAME] = "WikiText-2 articles, downloaded with data.download: true"
