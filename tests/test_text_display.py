"""Cosmetics of the text track's outputs (QA16 finding 10): the refusal lists "image attacks" (not "images attacks");
no token of the KJV BPE shows as U+FFFD on its own (a partial multi-byte character is shown as byte escapes); a
bag listing keeps token-leading spaces visible, the same in summary.md and report.html."""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from fedsim.attacking import AttackOutcome
from fedsim.cli import app
from fedsim.report.text import text_markdown, text_records, text_section
from fedsim.text.tokenizer import decode, decode_tokens, encode, load_tokenizer

TOK = "kjv-bpe-2048"
ROOT = Path(__file__).resolve().parents[1]


def test_an_image_dataset_refusal_names_image_attacks() -> None:
    result = CliRunner().invoke(app, ["validate", str(ROOT / "scenarios" / "quickstart.yaml"), "--set",
                                      "attacks=[{name: token_set}]"])
    assert result.exit_code == 2 and "(image attacks: " in result.output and "images attacks" not in result.output, \
        result.output


def test_no_token_shows_as_a_replacement_character() -> None:
    size = load_tokenizer(TOK).get_vocab_size(with_added_tokens=True)
    shown = decode_tokens(TOK, list(range(size)))
    assert not [s for s in shown if "\ufffd" in s]
    ascii_ids = encode(TOK, "And Jesus wept; and they said, Behold how he loved him!")
    assert "".join(decode_tokens(TOK, ascii_ids)) == decode(TOK, ascii_ids)


def test_bag_listing_keeps_leading_spaces_visible() -> None:
    the, th = encode(TOK, " the"), encode(TOK, "th")
    assert len(the) == 1 and len(th) == 1
    truth = torch.tensor([encode(TOK, "In the beginning")])
    o = AttackOutcome(attack="token_set", attack_index=0, round=1, partition_id=0, metrics={}, stats={}, seconds=0.1,
                      truth_tokens=truth, token_set=torch.tensor(sorted({the[0], th[0]})))
    records = text_records([o], TOK)
    md = "\n".join(text_markdown(records))
    page = html.unescape(re.sub(r"<[^>]+>", "", text_section(records)))
    for shown in (md, page):
        assert "\u2423the" in shown, shown
        assert re.search(r"(^|[\s\u00b7])th($|[\s\u00b7])", shown), shown
