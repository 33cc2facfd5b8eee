"""Rebuild the bundled text assets in ``fedsim/data/assets/text/`` from Debian's King James Bible.

    apt-get install bible-kjv          # pulls in bible-kjv-text (the KJV text and the BRS retrieval program)
    python -m fedsim.data.build_text_assets --out fedsim/data/assets/text [--raw kjv_raw.txt]

Source: the King James Version (1611; its copyright has expired, public domain), as printed by ``bible``, the
Bible Retrieval System by Chip Chapin (Debian packages ``bible-kjv`` / ``bible-kjv-text`` 4.38):
``bible -l100000 "Gen1:1-Rev22:21"`` (one line per verse; ``--raw FILE`` reads a saved dump instead). Its
output is ``"<Book> <chapter>"`` header lines, then ``"  <verse> <text>"`` lines.

Outputs (reproducible byte for byte: gzip with mtime 0, deterministic tokenizer training):

* ``kjv.tsv.gz``: one row per verse in canonical order, ``book<TAB>chapter<TAB>verse<TAB>text``; 66 books, 1,189
  chapters, 31,102 verses (checked). Whitespace inside a verse is normalised to single spaces (the dump has a few
  double spaces after a full stop) and trimmed; nothing else is changed.
* ``kjv-bpe-2048.json``: a byte-level BPE tokenizer (Hugging Face ``tokenizers``; GPT-2's byte-level
  pre-tokenizer without prefix space, so decode(encode(s)) == s for every string) with 2,048 tokens: ``[UNK]`` = 0,
  ``[MASK]`` = 1, the 256 byte symbols, then merges. It is trained on the Old Testament ONLY (the public
  pretraining part, :func:`fedsim.data.text.public_sequences`), so nothing of the New Testament, which the
  clients hold, leaks into the vocabulary.
* ``ATTRIBUTION.md``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import subprocess
from pathlib import Path

BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
NUM_OT_BOOKS = 39  # Genesis..Malachi; the New Testament is Matthew..Revelation (27 books)
EXPECTED = {"books": 66, "chapters": 1189, "verses": 31102}
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("[UNK]", "[MASK]")
TOKENIZER_FILE = f"kjv-bpe-{VOCAB_SIZE}.json"
CORPUS_FILE = "kjv.tsv.gz"

_HEADER = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (.*)$")

ATTRIBUTION = """# Bundled text: the King James Bible

* `kjv.tsv.gz`: the King James Version of the Bible (1611). Its copyright has expired; the text is in the public
  domain. Extracted with `bible -l100000 "Gen1:1-Rev22:21"` from Debian's packages `bible-kjv` and
  `bible-kjv-text` 4.38: the Bible Retrieval System (BRS) by Chip Chapin (Hewlett Packard Company, 1989-1993;
  "provided for unrestricted use"), ported to Linux by Christoph Lameter, maintained by Matthew Vernon. Whitespace
  inside a verse is normalised to single spaces; nothing else is changed. 66 books, 1,189 chapters, 31,102 verses.
* `kjv-bpe-2048.json`: a byte-level BPE tokenizer (Hugging Face `tokenizers`) trained by fedsim on the Old
  Testament verses only (`python -m fedsim.data.build_text_assets`).
"""


def dump_bible() -> str:
    """The whole KJV as printed by Debian's ``bible`` program (``apt-get install bible-kjv``)."""
    cmd = ["bible", "-l100000", "Gen1:1-Rev22:21"]
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("`bible` not found: apt-get install bible-kjv (or pass --raw with a saved dump)") from None


def normalize_text(text: str) -> str:
    """Runs of whitespace -> one space, trimmed (the only change made to a verse's text)."""
    return " ".join(text.split())


def parse_dump(raw: str) -> list[tuple[str, int, int, str]]:
    """``(book, chapter, verse, text)`` per verse, in order; SystemExit when the counts are not the KJV's."""
    rows: list[tuple[str, int, int, str]] = []
    book, chapter, chapters = "", 0, 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse is not None:
            if not book:
                raise SystemExit(f"verse line before any chapter header: {line[:60]!r}")
            rows.append((book, chapter, int(verse.group(1)), normalize_text(verse.group(2))))
            continue
        header = _HEADER.match(line)
        if header is None or header.group(1) not in BOOKS:
            raise SystemExit(f"unexpected line in the dump: {line[:60]!r}")
        book, chapter = header.group(1), int(header.group(2))
        chapters += 1
    books = [b for i, b in enumerate(r[0] for r in rows) if i == 0 or rows[i - 1][0] != b]
    got = {"books": len(books), "chapters": chapters, "verses": len(rows)}
    if got != EXPECTED or tuple(books) != BOOKS:
        raise SystemExit(f"the dump holds {got} (books in order: {tuple(books) == BOOKS}), expected {EXPECTED}")
    return rows


def write_corpus(rows: list[tuple[str, int, int, str]], path: Path) -> None:
    """``rows`` as a gzipped TSV (mtime 0, so the file is the same on every build)."""
    body = "".join(f"{b}\t{c}\t{v}\t{t}\n" for b, c, v, t in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(body)
    path.write_bytes(buf.getvalue())


def train_tokenizer(texts: list[str]):  # noqa: ANN201  (tokenizers.Tokenizer; imported lazily)
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens trained on ``texts``: deterministic (the same bytes with
    tokenizers 0.23.3 on 1, 2 and 4 threads, ``RAYON_NUM_THREADS``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"the tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok


def build(out: Path, raw: str) -> None:
    """Write the corpus, the tokenizer and the attribution into ``out``."""
    rows = parse_dump(raw)
    out.mkdir(parents=True, exist_ok=True)
    write_corpus(rows, out / CORPUS_FILE)
    public = set(BOOKS[:NUM_OT_BOOKS])
    tok = train_tokenizer([t for b, _, _, t in rows if b in public])
    (out / TOKENIZER_FILE).write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "text")
    parser.add_argument("--raw", type=Path, default=None, help="a saved `bible -l100000` dump (default: run bible)")
    args = parser.parse_args()
    raw = args.raw.read_text(encoding="utf-8") if args.raw else dump_bible()
    build(args.out, raw)
    for path in sorted(args.out.iterdir()):
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
