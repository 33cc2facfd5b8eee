"""Tokenizers of fedsim's text datasets, by name, and decoding token ids back to text for reports and metrics.

Tokenizers are Hugging Face ``tokenizers`` JSON files shipped in ``fedsim/data/assets/text/``:

* ``kjv-bpe-2048``: byte-level BPE (GPT-2's byte-level pre-tokenizer, no prefix space) of 2,048 tokens trained on
  the Old Testament of the King James Bible only (:mod:`fedsim.data.build_text_assets`). Special tokens ``[UNK]``
  = 0 (never produced: every byte has a token) and ``[MASK]`` = 1 (masked-LM pretraining). Byte-level means
  ``decode(encode(s)) == s`` for EVERY string, any whitespace or Unicode included.

Token id ``-1`` marks an unfilled position of a reconstruction (:class:`fedsim.threat.Reconstruction`
``tokens``): :func:`decode` skips it and :func:`decode_tokens` shows it as ``""``.

The loaded :class:`tokenizers.Tokenizer` is cached per process and shared: do not change its padding or
truncation settings (use ``encode``/``decode`` here, or copy it with ``Tokenizer.from_str(tok.to_str())``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.errors import RegistryError

if TYPE_CHECKING:
    import tokenizers
    import torch

ASSETS = Path(__file__).resolve().parent.parent / "data" / "assets" / "text"
TOKENIZERS: dict[str, str] = {"kjv-bpe-2048": "kjv-bpe-2048.json"}  # name -> file in ASSETS
MASK_TOKEN = "[MASK]"
UNK_TOKEN = "[UNK]"
UNFILLED = -1  # a reconstruction's position the attack did not fill


@cache
def load_tokenizer(name: str) -> tokenizers.Tokenizer:
    """The tokenizer called ``name`` (cached; shared, do not reconfigure it).

    Raises :class:`~fedsim.errors.RegistryError` listing the known names for an unknown one.
    """
    if name not in TOKENIZERS:
        known = ", ".join(sorted(TOKENIZERS)) or "none"
        raise RegistryError(f"unknown tokenizer {name!r} (known: {known})")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ASSETS / TOKENIZERS[name]))


def vocab_size(name: str) -> int:
    """Number of tokens of ``name`` (ids are in ``[0, vocab_size)``), special tokens included."""
    return load_tokenizer(name).get_vocab_size(with_added_tokens=True)


def mask_id(name: str) -> int:
    """The id of ``[MASK]`` in ``name``'s vocabulary (masked-LM pretraining)."""
    idx = load_tokenizer(name).token_to_id(MASK_TOKEN)
    if idx is None:  # pragma: no cover - every shipped tokenizer has it
        raise RegistryError(f"tokenizer {name!r} has no {MASK_TOKEN} token")
    return int(idx)


def encode(name: str, text: str) -> list[int]:
    """``text`` -> token ids (no special tokens added, no truncation)."""
    return list(load_tokenizer(name).encode(text, add_special_tokens=False).ids)


def encode_batch(name: str, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode` of each of ``texts``, one at a time on purpose: ``Tokenizer.encode_batch`` starts the
    library's thread pool, after which every fork (Ray, DataLoader workers) prints a warning and disables it, and it
    is no faster on a few shared cores (NT: 0.8 s sequential vs 1.1 s batched here)."""
    tok = load_tokenizer(name)
    return [list(tok.encode(text, add_special_tokens=False).ids) for text in texts]


def _ids(ids: Iterable[int] | torch.Tensor) -> list[int]:
    tolist = getattr(ids, "tolist", None)
    flat = tolist() if tolist is not None else list(ids)
    if flat and isinstance(flat[0], list):
        raise ValueError("decode takes ONE sequence of ids (T,), not a batch; decode each row")
    return [int(i) for i in flat]


def decode(name: str, ids: Iterable[int] | torch.Tensor) -> str:
    """Token ids (a list or a 1-D tensor) -> text. ``-1`` (unfilled) positions are skipped; special tokens are
    kept as their text (``[MASK]``) so nothing is dropped silently. Ids outside the vocabulary raise ValueError."""
    tok = load_tokenizer(name)
    kept = [i for i in _ids(ids) if i != UNFILLED]
    _check_range(name, kept, tok.get_vocab_size(with_added_tokens=True))
    return tok.decode(kept, skip_special_tokens=False)


def decode_tokens(name: str, ids: Iterable[int] | torch.Tensor) -> list[str]:
    """One display string per id, in order (for highlighting matched tokens): the token's text with its leading
    space (``" the"``), ``"[MASK]"`` for a special token, ``""`` for ``-1`` (unfilled). For ASCII text
    ``"".join(decode_tokens(name, ids)) == decode(name, ids)``; a token holding part of a multi-byte character
    shows its bytes, escaped (``"\\xe2"``), not U+FFFD."""
    tok = load_tokenizer(name)
    flat = _ids(ids)
    _check_range(name, [i for i in flat if i != UNFILLED], tok.get_vocab_size(with_added_tokens=True))
    return ["" if i == UNFILLED else _shown(tok, i) for i in flat]


def _shown(tok: tokenizers.Tokenizer, i: int) -> str:
    """Token ``i`` decoded alone; a byte-level token that is part of a multi-byte character (decoded alone it
    would be U+FFFD) as its bytes, the incomplete ones escaped (``"\\xe2\\x80"``)."""
    text = tok.decode([i], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    piece = tok.id_to_token(i) or ""
    decoder = _byte_decoder()
    if not piece or any(c not in decoder for c in piece):
        return text  # not a byte-level piece: keep the tokenizer's own text
    return bytes(decoder[c] for c in piece).decode("utf-8", errors="backslashreplace")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (Radford et al. 2019; ``tokenizers``' ByteLevel): char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _check_range(name: str, ids: list[int], size: int) -> None:
    bad = next((i for i in ids if not 0 <= i < size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside tokenizer {name!r}'s vocabulary [0, {size}) (-1 = unfilled)")
