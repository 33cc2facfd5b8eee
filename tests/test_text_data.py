"""Text data (issue 16): the bundled KJV asset, its tokenizer, the kjv / kjv-genre / wikitext-2 datasets, the public
pretraining part, partition.kind by_source and the validation of text-only fields.

Expected values come from outside the code under test: the KJV's published counts (66 books, 1,189 chapters,
31,102 verses; 23,145 in the Old Testament), its first and last verse, the canonical genre of each book written
out here, brute-force recounts straight from the gzipped TSV, and a tiny hand-made WikiText folder."""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.data import load_dataset, partition_indices
from fedsim.data.sources import client_examples, examples_of, overlap
from fedsim.data.text import public_examples, public_sequences
from fedsim.errors import DataUnavailableError, RegistryError, ScenarioError
from fedsim.scenario import DataSpec, PartitionSpec
from fedsim.text.tokenizer import ASSETS, decode, decode_tokens, encode, load_tokenizer, mask_id

TOK = "kjv-bpe-2048"
runner = CliRunner()


def _rows() -> list[tuple[str, int, int, str]]:
    with gzip.open(ASSETS / "kjv.tsv.gz", "rt", encoding="utf-8") as fh:
        return [(b, int(c), int(v), t) for b, c, v, t in (line.rstrip("\n").split("\t") for line in fh)]


ROWS = _rows()
NT_START = next(i for i, r in enumerate(ROWS) if r[0] == "Matthew")


def test_asset_is_the_whole_kjv() -> None:
    books = list(dict.fromkeys(r[0] for r in ROWS))
    assert len(books) == 66 and len(ROWS) == 31102
    assert len({(r[0], r[1]) for r in ROWS}) == 1189
    assert NT_START == 23145 and books[39] == "Matthew" and books[-1] == "Revelation"
    assert ROWS[0] == ("Genesis", 1, 1, "In the beginning God created the heaven and the earth.")
    assert ROWS[-1] == ("Revelation", 22, 21, "The grace of our Lord Jesus Christ be with you all. Amen.")
    assert ("John", 11, 35, "Jesus wept.") in ROWS
    assert all(t == " ".join(t.split()) and t for *_, t in ROWS)  # the documented whitespace normalisation


def test_tokenizer_round_trips_every_verse_and_marks_unfilled() -> None:
    tok = load_tokenizer(TOK)
    assert tok.get_vocab_size() == 2048 and tok.token_to_id("[UNK]") == 0 and mask_id(TOK) == 1
    texts = [t for *_, t in ROWS[NT_START:]] + [t for *_, t in ROWS[:NT_START:7]]  # every NT verse, 1/7 of OT
    assert all(tok.decode(e.ids) == t for e, t in zip(tok.encode_batch(texts), texts, strict=True))
    odd = "Café — naïve\tdouble  space\n"  # byte-level: any text, any whitespace, round-trips exactly
    ids = encode(TOK, odd)
    assert decode(TOK, ids) == odd and 0 not in ids
    ids = encode(TOK, "And God said")
    assert decode(TOK, [ids[0], -1, *ids[1:]]) == "And God said"
    shown = decode_tokens(TOK, torch.tensor([ids[0], -1, *ids[1:], 1]))
    assert len(shown) == len(ids) + 2 and shown[1] == "" and shown[-1] == "[MASK]"
    assert "".join(shown) == "And God said[MASK]"
    with pytest.raises(ValueError, match="outside"):
        decode(TOK, [2048])
    with pytest.raises(RegistryError, match="kjv-bpe-2048"):
        load_tokenizer("gpt2")


@functools.cache
def _lengths(start: int, stop: int) -> tuple[int, ...]:
    return tuple(len(e.ids) for e in load_tokenizer(TOK).encode_batch([r[3] for r in ROWS[start:stop]]))


def _kept_by_brute_force(start: int, stop: int, seq_len: int) -> list[int]:
    """Positions of the verses in ROWS[start:stop] with at least ``seq_len`` tokens, straight from the TSV."""
    return [start + i for i, n in enumerate(_lengths(start, stop)) if n >= seq_len]


@functools.cache
def _first_ids(start: int, stop: int, seq_len: int) -> dict[int, tuple[int, ...]]:
    """Verse position -> its first ``seq_len`` ids, for the verses of ROWS[start:stop] with >= ``seq_len``."""
    enc = load_tokenizer(TOK).encode_batch([r[3] for r in ROWS[start:stop]])
    return {start + i: tuple(e.ids[:seq_len]) for i, e in enumerate(enc) if len(e.ids) >= seq_len}


def _split_by_brute_force(seq_len: int, fraction: float) -> tuple[set[int], list[int]]:
    """(train positions, test positions): each book's last ceil(n * fraction) kept verses (books with >= 2), minus
    every test verse whose first ``seq_len`` ids equal a train verse's (the documented de-duplication)."""
    ids = _first_ids(NT_START, len(ROWS), seq_len)
    tail: list[int] = []
    for book in dict.fromkeys(r[0] for r in ROWS[NT_START:]):
        mine = [i for i in ids if ROWS[i][0] == book]
        tail += mine[len(mine) - math.ceil(len(mine) * fraction):] if len(mine) >= 2 else []
    train = set(ids) - set(tail)
    train_rows = {ids[i] for i in train}
    return train, [i for i in tail if ids[i] not in train_rows]


@pytest.mark.parametrize("seq_len", [16, 8])
def test_kjv_examples_are_the_first_t_tokens_of_long_enough_nt_verses(seq_len: int) -> None:
    spec = DataSpec(dataset="kjv", seq_len=None if seq_len == 16 else seq_len)
    b = load_dataset(spec)
    assert b.is_text and b.task == "language_modeling" and b.vocab_size == 2048 and b.tokenizer == TOK
    for x, y in ((b.train_x, b.train_y), (b.test_x, b.test_y)):
        assert x.dtype == torch.int64 and x.shape[1] == seq_len and torch.equal(x, y)
        assert int(x.min()) >= 0 and int(x.max()) < 2048
    kept = _kept_by_brute_force(NT_START, len(ROWS), seq_len)
    want_train, want_test = _split_by_brute_force(seq_len, 0.2)
    assert b.num_train == len(want_train) and len(b.test_x) == len(want_test)
    if seq_len == 16:  # the numbers the module docstring states
        assert len(kept) == 7636 and (b.num_train, len(b.test_x)) == (6097, 1536)
    train = examples_of("kjv", "train", spec=spec).indices
    test = examples_of("kjv", "test", spec=spec).indices
    assert set(train) == want_train and sorted(test) == sorted(want_test)
    # each example is the start of its own verse, and its group is that verse's book
    rows = _train_rows(spec)
    for i in range(0, b.num_train, 97):
        verse = ROWS[rows[i]]
        assert verse[3].startswith(decode(TOK, b.train_x[i])) and b.source_names[int(b.groups[i])] == verse[0]


def _train_rows(spec: DataSpec) -> np.ndarray:
    from fedsim.data.text import _split, seq_len_of

    return _split(seq_len_of(spec), spec.test_fraction).train_rows


def test_test_split_is_the_tail_of_every_book_and_train_order_spans_books() -> None:
    spec = DataSpec(dataset="kjv", test_fraction=0.25)
    b = load_dataset(spec)
    test_rows = examples_of("kjv", "test", spec=spec).indices
    kept = _kept_by_brute_force(NT_START, len(ROWS), 16)
    _, deduplicated = _split_by_brute_force(16, 0.25)
    for book in dict.fromkeys(r[0] for r in ROWS[NT_START:]):
        mine = [i for i in kept if ROWS[i][0] == book]
        want = mine[len(mine) - math.ceil(len(mine) * 0.25):] if len(mine) >= 2 else []
        want = [i for i in want if i in set(deduplicated)]  # minus test verses equal to a train row
        assert sorted(set(test_rows) & set(mine)) == want, book
    assert len(set(b.groups[:27].tolist())) == 27  # book-interleaved: the first 27 train examples are 27 books
    again = load_dataset(spec)
    assert torch.equal(again.train_x, b.train_x) and torch.equal(again.test_x, b.test_x)


GENRE = {  # canonical: Gospels, Acts, Pauline epistles (Romans..Philemon), General epistles (Hebrews..Jude), Rev.
    **dict.fromkeys(["Matthew", "Mark", "Luke", "John"], 0), "Acts": 1,
    **dict.fromkeys(["Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
                     "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
                     "Philemon"], 2),
    **dict.fromkeys(["Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude"], 3),
    "Revelation": 4,
}


def test_kjv_genre_labels_each_verse_with_its_books_genre() -> None:
    spec = DataSpec(dataset="kjv-genre")
    b, lm = load_dataset(spec), load_dataset(DataSpec(dataset="kjv"))
    assert b.task == "classification" and b.num_classes == 5 and torch.equal(b.train_x, lm.train_x)
    assert len(GENRE) == 27
    want = torch.tensor([GENRE[b.source_names[int(g)]] for g in b.groups])
    assert torch.equal(b.train_y, want)
    test_rows = examples_of("kjv-genre", "test", spec=spec).indices
    assert b.test_y.tolist() == [GENRE[ROWS[i][0]] for i in test_rows]


def test_public_part_is_the_old_testament_and_disjoint_from_clients() -> None:
    spec = DataSpec(dataset="kjv")
    pub = public_sequences(spec, 16)
    nt_rows = set(_first_ids(NT_START, len(ROWS), 16).values())
    kept = [i for i, ids in _first_ids(0, NT_START, 16).items() if ids not in nt_rows]  # minus rows equal to NT's
    assert pub.dtype == torch.int64 and tuple(pub.shape) == (len(kept), 16) == (22366, 16)
    tok = load_tokenizer(TOK)
    for j in range(0, len(kept), 501):
        assert torch.equal(pub[j], torch.tensor(tok.encode(ROWS[kept[j]][3]).ids[:16]))
    where = public_examples(spec, 16)
    assert np.array_equal(where.indices, kept) and max(kept) < NT_START
    for split in ("train", "test"):
        held = examples_of("kjv-genre", split, spec=DataSpec(dataset="kjv-genre")).indices
        assert min(held) >= NT_START
    assert overlap(where, client_examples(spec)) is None
    assert overlap(where, examples_of("kjv", "test", spec=spec)) is None
    # the overlap check is live: the public part against itself does overlap
    assert overlap(where, where) is not None
    for name in ("wikitext-2", "mnist-mini"):
        with pytest.raises(ScenarioError, match="no public part") as err:
            public_sequences(DataSpec(dataset=name), 16)
        assert err.value.path == "model.pretrain"


def test_by_source_deals_whole_books_deterministically() -> None:
    groups = load_dataset(DataSpec(dataset="kjv")).groups.numpy()
    spec = PartitionSpec(kind="by_source")
    parts = partition_indices(groups, 5, spec, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(groups)))  # every example once
    owners = [set(groups[p].tolist()) for p in parts]
    for book in range(27):  # brute force: every book lies wholly inside exactly one client
        holders = [k for k, p in enumerate(parts) if book in owners[k]]
        assert len(holders) == 1 and set(np.flatnonzero(groups == book)) <= set(parts[holders[0]].tolist())
    assert sorted(len(o) for o in owners) == [5, 5, 5, 6, 6]  # 27 books dealt round-robin
    again = partition_indices(groups, 5, spec, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(groups, 5, spec, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    with pytest.raises(ScenarioError, match="27 sources") as err:
        partition_indices(groups, 28, spec, seed=0)
    assert err.value.path == "federation.clients"


def _scenario(tmp_path: Path, **data) -> dict:
    return {"name": "text", "seed": 0, "device": "cpu",
            "data": {"dataset": "kjv", "partition": {"kind": "by_source"}, **data},
            "model": {"name": "gpt", "width": 32},
            "federation": {"clients": 4, "rounds": 1, "protocol": "fedsgd", "local": {"batch_size": 8}},
            "backend": {"kind": "inprocess"}, "output": {"dir": str(tmp_path / "runs")}}


def _validate(tmp_path: Path, raw: dict) -> tuple[int, str]:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


def test_setup_partitions_by_book(tmp_path: Path) -> None:
    from fedsim.scenario import load_scenario
    from fedsim.simulation.setup import FederationSetup

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_scenario(tmp_path)))
    setup = FederationSetup(load_scenario(path))
    groups = setup.data.groups.numpy()
    books = [set(groups[p].tolist()) for p in setup.partitions]
    assert sum(len(b) for b in books) == 27 and len(set().union(*books)) == 27


@pytest.mark.parametrize(("data", "model", "field", "words"), [
    ({"partition": {"kind": "dirichlet"}}, {}, "data.partition.kind", "language-modeling"),
    ({"partition": {"kind": "shards"}}, {}, "data.partition.kind", "use kind: iid or by_source"),
    ({"dataset": "mnist-mini", "partition": {"kind": "iid"}, "seq_len": 8}, {"name": "convnet"}, "data.seq_len",
     "only text datasets"),
    ({"dataset": "mnist-mini"}, {"name": "convnet"}, "data.partition.kind", "by_source deals out whole sources"),
    ({"dataset": "wikitext-2", "root": "EMPTY"}, {"pretrain": {"steps": 1}}, "model.pretrain", "no public part"),
    ({"seq_len": 200}, {}, "data.seq_len", "longest has"),
    ({}, {"__clients": 30}, "federation.clients", "27 sources"),
])
def test_validate_refuses_with_one_line(tmp_path: Path, data: dict, model: dict, field: str, words: str) -> None:
    raw = _scenario(tmp_path, **data)
    if raw["data"].get("root") == "EMPTY":
        raw["data"]["root"] = str(tmp_path / "empty")
    if "__clients" in model:
        raw["federation"]["clients"] = model.pop("__clients")
    raw["model"].update(model)
    code, out = _validate(tmp_path, raw)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}:") and words in lines[0], out
    assert not (tmp_path / "runs").exists()


def test_valid_text_scenario_validates(tmp_path: Path) -> None:
    code, out = _validate(tmp_path, _scenario(tmp_path))
    assert code == 0, out


def test_wikitext_absent_is_one_clear_error_without_network(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(DataSpec(dataset="wikitext-2", root=str(root), download=False))
    message = str(err.value)
    assert "\n" not in message and "data.download: true" in message and "Salesforce/wikitext" in message
    assert not root.exists()  # nothing created


def test_wikitext_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataUnavailableError, match="downloading .* failed") as err:
        load_dataset(DataSpec(dataset="wikitext-2", root=str(tmp_path), download=True))
    assert "\n" not in str(err.value)


def test_wikitext_saved_folder_is_chunked_per_article(tmp_path: Path) -> None:
    import datasets

    train = [" = Alpha = \n", " The first article has several words in it , more than a few .\n", "\n",
             " = Beta = \n", " = = Section = = \n", " Second one is also long enough to hold a chunk or two .\n"]
    test = [" = Gamma = \n", " A test article with enough words to make one chunk at least .\n"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                               "test": datasets.Dataset.from_dict({"text": test})})
    dd.save_to_disk(str(tmp_path / "wikitext-2-raw-v1"))
    b = load_dataset(DataSpec(dataset="wikitext-2", root=str(tmp_path), seq_len=4))
    assert b.source_names == ("Alpha", "Beta") and b.train_x.shape[1] == 4 and len(b.test_x) >= 1
    tok = load_tokenizer(TOK)
    for g, lines in ((0, train[:3]), (1, train[3:])):  # brute force: the article's ids cut into 4-id pieces
        ids = tok.encode("".join(lines)).ids
        want = torch.tensor([ids[i:i + 4] for i in range(0, len(ids) - 3, 4)])
        assert torch.equal(b.train_x[b.groups == g], want)


def test_list_describes_text_datasets() -> None:
    from fedsim.cli import _dataset_summary

    for name in ("kjv", "kjv-genre", "wikitext-2"):
        line = _dataset_summary(name)
        assert "token ids" in line and "seq_len 16" in line and "vocab 2048" in line, line
    assert "public part" in _dataset_summary("kjv") and "public part" not in _dataset_summary("wikitext-2")
    assert "5 genres" in _dataset_summary("kjv-genre") and "classification" in _dataset_summary("kjv-genre")


def test_build_script_reproduces_the_shipped_assets(tmp_path: Path) -> None:
    """Parsing a `bible -l100000` dump and training the tokenizer on its Old Testament give the shipped bytes."""
    from fedsim.data import build_text_assets as build

    dump, book, chapter = [], "", 0
    for b, c, v, t in ROWS:  # the dump's layout: "Book N" headers, then "  V text" lines
        if (b, c) != (book, chapter):
            dump += ["", f"{b} {c}", ""]
            book, chapter = b, c
        dump.append(f"  {v} {t}")
    build.build(tmp_path, "\n".join(dump) + "\n")
    for name in ("kjv.tsv.gz", "kjv-bpe-2048.json", "ATTRIBUTION.md"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
    with pytest.raises(SystemExit, match="31101"):  # a verse missing is refused
        build.parse_dump("\n".join(dump[:-1]) + "\n")


@pytest.mark.parametrize("seq_len", [8, 12, 16])
@pytest.mark.parametrize("name", ["kjv", "kjv-genre"])
def test_no_t_token_row_is_in_two_parts(name: str, seq_len: int) -> None:
    """Disjointness at the unit the model consumes (issue 16 review, finding 7): no T-token id row of the public
    part equals a train or test row, and no test row equals a train row. Brute force over the rows as tuples
    (on the undeduplicated verses: T 16: 2 train rows equal public rows, 3 test rows equal train rows; T 8: 70/41)."""
    spec = DataSpec(dataset=name, seq_len=seq_len)
    b = load_dataset(spec)
    public = {tuple(r) for r in public_sequences(spec, seq_len).tolist()}
    train = {tuple(r) for r in b.train_x.tolist()}
    test = {tuple(r) for r in b.test_x.tolist()}
    assert public and train and test
    assert not public & train and not public & test and not test & train


def test_wikitext_test_chunk_equal_to_a_train_chunk_is_dropped(tmp_path: Path) -> None:
    """WikiText's train and test splits are different articles, but identical T-id chunks can occur in both
    (here a test article repeats a train article): no test row may equal a train row (brute-force sets)."""
    import datasets

    train = [" = Alpha = \n", " The first article has several words in it , more than a few .\n"]
    test = [" = Alpha = \n", " The first article has several words in it , more than a few .\n",
            " = Gamma = \n", " A test article with enough words to make one chunk at least .\n"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                               "test": datasets.Dataset.from_dict({"text": test})})
    dd.save_to_disk(str(tmp_path / "wikitext-2-raw-v1"))
    b = load_dataset(DataSpec(dataset="wikitext-2", root=str(tmp_path), seq_len=4))
    train_rows = {tuple(r) for r in b.train_x.tolist()}
    assert not train_rows & {tuple(r) for r in b.test_x.tolist()}
    ids = load_tokenizer(TOK).encode("".join(test[2:])).ids  # the distinct article's chunks all stay
    want = [tuple(ids[i:i + 4]) for i in range(0, len(ids) - 3, 4)]
    assert [tuple(r) for r in b.test_x.tolist()][-len(want):] == want
