"""Text datasets: token ids (N, T) of the King James Bible (bundled, offline) and WikiText-2 (downloaded).

All use the ``kjv-bpe-2048`` tokenizer (:mod:`fedsim.text.tokenizer`; byte-level BPE, 2,048 tokens, trained on the
Old Testament only). T is ``data.seq_len`` (default 16).

**The corpus split.** The King James Bible (``fedsim/data/assets/text/kjv.tsv.gz``: 66 books, 31,102 verses;
:mod:`fedsim.data.build_text_assets`) is cut in two by testament, never mixed:

* the **Old Testament** (39 books, 23,145 verses) is the PUBLIC part: the tokenizer's training text and the
  pretraining corpus (:func:`public_sequences`); no client ever holds any of it;
* the **New Testament** (27 books, 7,957 verses) is the PRIVATE part the clients hold (``kjv``, ``kjv-genre``).

**The rule for examples.** A verse becomes one example when it has at least T tokens: its FIRST T tokens (a
shorter verse is dropped, nothing is padded or joined across verses). At T = 16, 7,636 of the 7,957 New Testament
verses are kept (22,368 of the 23,145 Old Testament ones, 22,366 of them in the public part: see below).

**Train/test.** Within each book, the LAST ``ceil(n * test_fraction)`` kept verses are the test set (a book with
fewer than two kept verses is train only), so both splits cover every book; no randomness at all. The train
examples are ordered book-interleaved (1st kept verse of each book, then the 2nd, ...), so ``data.train_subset``
(the first N) still spans the books. ``groups`` is each train example's book (0 = Matthew .. 26 = Revelation,
``source_names``) for ``partition.kind: by_source``.

**No example in two parts.** The parts are disjoint as the model sees them, by T-token id row, not only by verse
(many verses share their first T tokens; :mod:`fedsim.data.dedup`): a test verse whose row equals a train row is
dropped from the test set, and an Old Testament verse whose row equals the row of any kept New Testament verse
(train, test or dropped test) is dropped from the public part. Dropped at ``test_fraction`` 0.2: T = 16: 3 test
rows (1,536 test, 6,097 train remain) and 2 public rows (22,366 remain); T = 12: 13 test, 6 public; T = 8: 48
test, 149 public. Rows repeated WITHIN a part are kept (the same opening in two train verses is two examples).

Datasets:

* ``kjv``: ``language_modeling``; labels are the token ids themselves (N, T).
* ``kjv-genre``: ``classification`` of a verse by the genre of its book, 5 classes (:data:`GENRES`): Gospels
  (Matthew-John), Acts, Pauline epistles (Romans-Philemon, 13 letters), General epistles (Hebrews-Jude: Hebrews,
  whose authorship is disputed, is counted with the general letters), Revelation.
* ``wikitext-2``: ``language_modeling`` on WikiText-2 (raw, v1; Merity et al., 2016, CC BY-SA 3.0) from
  Hugging Face (``Salesforce/wikitext``, ``wikitext-2-raw-v1``), saved under ``data.root``; see
  :mod:`fedsim.data.wikitext`.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.data.build_text_assets import BOOKS, CORPUS_FILE, NUM_OT_BOOKS
from fedsim.data.bundle import DatasetBundle, class_interleaved, num_test_examples
from fedsim.data.catalog import DATASETS, DatasetFacts, declare_facts, facts_of
from fedsim.data.dedup import rows_not_in
from fedsim.data.sources import Examples, declare_source
from fedsim.errors import ScenarioError
from fedsim.text.tokenizer import ASSETS, encode_batch, vocab_size

if TYPE_CHECKING:
    from fedsim.scenario import DataSpec

TOKENIZER = "kjv-bpe-2048"
DEFAULT_SEQ_LEN = 16
COLLECTION = "King James Bible verses"  # sources.py collection; indices = verse positions 0..31101
NT_BOOKS: tuple[str, ...] = BOOKS[NUM_OT_BOOKS:]
GENRES: tuple[str, ...] = ("Gospels", "Acts", "Pauline epistles", "General epistles", "Revelation")
_GENRE_STARTS = {"Matthew": 0, "Acts": 1, "Romans": 2, "Hebrews": 3, "Revelation": 4}  # first book of each genre
ATTRIBUTION = ("King James Bible (1611, public domain), via Debian's bible-kjv-text (BRS by Chip Chapin); "
               "tokenizer kjv-bpe-2048 trained by fedsim on the Old Testament")


def seq_len_of(spec: DataSpec) -> int:
    """T of a text dataset: ``data.seq_len``, else the dataset's declared default."""
    return int(spec.seq_len or facts_of(spec.dataset).seq_len or DEFAULT_SEQ_LEN)


def genre_of_book() -> np.ndarray:
    """(27,) genre index (:data:`GENRES`) of each New Testament book, in canonical order."""
    out, genre = [], -1
    for book in NT_BOOKS:
        genre = _GENRE_STARTS.get(book, genre)
        out.append(genre)
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class _Corpus:
    book: np.ndarray  # (31102,) int64 book index into BOOKS, canonical order
    texts: tuple[str, ...]  # (31102,) verse texts


@lru_cache(maxsize=1)
def _corpus() -> _Corpus:
    books, texts = [], []
    index = {b: i for i, b in enumerate(BOOKS)}
    with gzip.open(ASSETS / CORPUS_FILE, "rt", encoding="utf-8") as fh:
        for line in fh:
            book, _chapter, _verse, text = line.rstrip("\n").split("\t")
            books.append(index[book])
            texts.append(text)
    return _Corpus(np.asarray(books, dtype=np.int64), tuple(texts))


@lru_cache(maxsize=2)
def _testament_ids(public: bool) -> tuple[np.ndarray, tuple[list[int], ...]]:
    """(verse positions, token ids per verse) of the Old (``public``) or New Testament (tokenized once)."""
    corpus = _corpus()
    rows = np.flatnonzero((corpus.book < NUM_OT_BOOKS) == public)
    return rows, tuple(encode_batch(TOKENIZER, [corpus.texts[i] for i in rows]))


def _kept(public: bool, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(verse positions (M,), first ``seq_len`` ids (M, T)) of the verses of a testament with >= T tokens."""
    rows, ids = _testament_ids(public)
    keep = [i for i, seq in enumerate(ids) if len(seq) >= seq_len]
    x = np.asarray([ids[i][:seq_len] for i in keep], dtype=np.int64).reshape(len(keep), seq_len)
    return rows[keep], x


@dataclass(frozen=True)
class _Split:
    train_rows: np.ndarray  # verse positions of the train examples, in train order
    test_rows: np.ndarray
    train_x: np.ndarray
    test_x: np.ndarray


def _split(seq_len: int, test_fraction: float) -> _Split:
    """The module's train/test rule on the kept New Testament verses (see the module docstring)."""
    rows, x = _kept(False, seq_len)
    if len(rows) < 2:
        longest = max(len(s) for s in _testament_ids(False)[1])
        raise ScenarioError("data.seq_len", f"{seq_len} tokens: fewer than two New Testament verses are that long "
                                            f"(the longest has {longest} tokens); use a smaller data.seq_len")
    book = _corpus().book[rows]
    is_test = np.zeros(len(rows), dtype=bool)
    for b in np.unique(book):
        members = np.flatnonzero(book == b)
        if len(members) >= 2:
            is_test[members[len(members) - num_test_examples(len(members), test_fraction):]] = True
    train = np.flatnonzero(~is_test)
    train = train[class_interleaved(book[train])]
    test = np.flatnonzero(is_test)
    test = test[rows_not_in(x[test], x[train])]  # no test row equals a train row (module docstring)
    return _Split(rows[train], rows[test], x[train], x[test])


def _nt_book(rows: np.ndarray) -> np.ndarray:
    """New Testament book index (0 = Matthew .. 26 = Revelation) of verse positions ``rows``."""
    return _corpus().book[rows] - NUM_OT_BOOKS


def _bundle(name: str, spec: DataSpec, genre: bool) -> DatasetBundle:
    s = _split(seq_len_of(spec), spec.test_fraction)
    train_x, test_x = torch.from_numpy(s.train_x), torch.from_numpy(s.test_x)
    if genre:
        genres = genre_of_book()
        train_y = torch.from_numpy(genres[_nt_book(s.train_rows)])
        test_y = torch.from_numpy(genres[_nt_book(s.test_rows)])
        task, classes = "classification", len(GENRES)
    else:
        train_y, test_y, task, classes = train_x.clone(), test_x.clone(), "language_modeling", vocab_size(TOKENIZER)
    return DatasetBundle(name=name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                         num_classes=classes, mean=(), std=(), attribution=ATTRIBUTION, task=task,
                         vocab_size=vocab_size(TOKENIZER), tokenizer=TOKENIZER,
                         groups=torch.from_numpy(_nt_book(s.train_rows)), source_names=NT_BOOKS)


def load_kjv(spec: DataSpec) -> DatasetBundle:
    """``kjv``: next-token prediction on New Testament verses (first T tokens of each verse with >= T)."""
    return _bundle("kjv", spec, genre=False)


def load_kjv_genre(spec: DataSpec) -> DatasetBundle:
    """``kjv-genre``: the same verses as ``kjv``, labelled with their book's genre (5 classes, :data:`GENRES`)."""
    return _bundle("kjv-genre", spec, genre=True)


@lru_cache(maxsize=4)
def _public(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(verse positions (M,), ids (M, T)) of the public part: the kept Old Testament verses whose first T ids
    equal those of no kept New Testament verse (module docstring)."""
    rows, x = _kept(True, seq_len)
    keep = rows_not_in(x, _kept(False, seq_len)[1])
    return rows[keep], x[keep]


def kjv_public_sequences(spec: DataSpec, seq_len: int) -> torch.Tensor:
    """int64 (M, seq_len): the first ``seq_len`` tokens of every Old Testament verse with >= ``seq_len`` tokens
    whose row equals no New Testament example's, in canonical order (M = 22,366 at T = 16)."""
    return torch.from_numpy(_public(seq_len)[1].copy())


def kjv_public_examples(spec: DataSpec, seq_len: int) -> Examples:
    """The verse positions :func:`kjv_public_sequences` uses, as a :mod:`fedsim.data.sources` example set."""
    rows = _public(seq_len)[0]
    return Examples(COLLECTION, "all", rows.astype(np.int64), f"Old Testament verses with >= {seq_len} tokens")


PublicPart = Callable[["DataSpec", int], torch.Tensor]
PUBLIC_PARTS: dict[str, PublicPart] = {"kjv": kjv_public_sequences, "kjv-genre": kjv_public_sequences}
PUBLIC_EXAMPLES: dict[str, Callable[[DataSpec, int], Examples]] = {
    "kjv": kjv_public_examples, "kjv-genre": kjv_public_examples}


def has_public_part(dataset: str) -> bool:
    """Whether ``dataset`` has a public pretraining part (:func:`public_sequences`)."""
    return dataset in PUBLIC_PARTS


def public_sequences(spec: DataSpec, seq_len: int) -> torch.Tensor:
    """The PUBLIC pretraining corpus of ``spec.dataset``: token ids int64 (M, seq_len), disjoint from every
    example any client of that dataset can hold (for ``kjv``/``kjv-genre``: Old Testament verses under the same
    first-T-tokens rule, while clients hold New Testament verses; :func:`public_examples` gives the positions).

    Raises :class:`~fedsim.errors.ScenarioError` (at ``model.pretrain``) for a dataset without a public part.
    """
    part = PUBLIC_PARTS.get(spec.dataset)
    if part is None:
        raise ScenarioError("model.pretrain", no_public_part(spec.dataset))
    x = part(spec, seq_len)
    if len(x) == 0:
        raise ScenarioError("data.seq_len", f"no public {spec.dataset!r} sequence has {seq_len} tokens")
    return x


def public_examples(spec: DataSpec, seq_len: int) -> Examples:
    """Which examples of which collection :func:`public_sequences` returns (compare with
    :func:`fedsim.data.sources.client_examples` via :func:`fedsim.data.sources.overlap`)."""
    part = PUBLIC_EXAMPLES.get(spec.dataset)
    if part is None:
        raise ScenarioError("model.pretrain", no_public_part(spec.dataset))
    return part(spec, seq_len)


def no_public_part(dataset: str) -> str:
    """The one-line reason why ``dataset`` cannot be pretrained on (no public part)."""
    return (f"dataset {dataset!r} has no public part to pretrain on (datasets with one: "
            f"{', '.join(sorted(PUBLIC_PARTS))}); remove model.pretrain or change data.dataset")


TOKENIZER_OF: dict[str, str] = {"kjv": TOKENIZER, "kjv-genre": TOKENIZER}  # each text dataset's tokenizer
PARTS: dict[str, str] = {  # how each text dataset's examples are made, for `fedsim list`
    "kjv": "New Testament verses, 27 books",
    "kjv-genre": f"New Testament verses, {len(GENRES)} genres, 27 books",
}


def describe_text_dataset(name: str) -> str:
    """One line for ``fedsim list``: task, token ids of length T (default), vocabulary, what the examples are."""
    facts = facts_of(name)
    tokenizer = TOKENIZER_OF.get(name, TOKENIZER)
    public = "; public part for model.pretrain" if has_public_part(name) else ""
    return (f"text {facts.task} (token ids, data.seq_len {facts.seq_len} by default, vocab {vocab_size(tokenizer)} "
            f"of {tokenizer}; {PARTS.get(name, 'downloaded')}{public})")


@dataclass(frozen=True)
class VerseSource:
    """:class:`~fedsim.data.sources.Source` of the KJV datasets: train/test position p is a verse position."""

    def examples(self, dataset: str, split: str, start: int, stop: int | None, spec: DataSpec) -> Examples:
        s = _split(seq_len_of(spec), spec.test_fraction)
        rows = (s.train_rows if split == "train" else s.test_rows)[start:stop]
        what = f"{dataset} {split} examples {start}..{'end' if stop is None else stop - 1}"
        return Examples(COLLECTION, "all", np.unique(rows).astype(np.int64), what)


for _name, _loader, _task in (("kjv", load_kjv, "language_modeling"),
                              ("kjv-genre", load_kjv_genre, "classification")):
    DATASETS.add(_name, _loader)
    declare_facts(_name, DatasetFacts(task=_task, inputs="tokens", seq_len=DEFAULT_SEQ_LEN))
    declare_source(_name, VerseSource())
