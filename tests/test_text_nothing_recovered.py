"""A text attack that ran and recovered nothing (DP-SGD's noise: DAGER's empty sequence set, token_set's empty bag)
shows the client's original sequences with "nothing recovered" and the attack's one-line reason (its stats' text
entries) in summary.md and report.html: not an empty section, and not "failed" (it ran)."""

from __future__ import annotations

import html
import re

import pytest
import torch

from fedsim.attacking import AttackOutcome
from fedsim.report.text import text_markdown, text_records, text_section
from fedsim.text.tokenizer import encode

TOK = "kjv-bpe-2048"
VERSES = ["In the beginning was the Word", "Jesus wept and the people saw"]
WHY = {"partial": "no candidate passed at position 0",
       "rank_truncated": "numerical ranks [128, 128] exceed the 60 tokens (a noisy gradient)"}


def _truth() -> torch.Tensor:
    rows = [encode(TOK, v) for v in VERSES]
    t = min(len(r) for r in rows)
    assert all(len(r) == t for r in rows), "the test verses must encode to the same length"
    return torch.tensor(rows)


@pytest.mark.parametrize("kind", ["sequences", "bag"])
def test_nothing_recovered_shows_the_originals_and_the_reason(kind: str) -> None:
    truth = _truth()
    empty = {"tokens": torch.empty(0, truth.shape[1], dtype=torch.int64)} if kind == "sequences" else \
        {"token_set": torch.empty(0, dtype=torch.int64)}
    o = AttackOutcome(attack="dager" if kind == "sequences" else "token_set", attack_index=1, round=1,
                      partition_id=0, metrics={"rougeL_mean": 0.0, "exact_seq_rate": 0.0}, stats={**WHY, "batch": 2.0},
                      seconds=0.1, truth_tokens=truth, **empty)
    records = text_records([o], TOK)
    md = "\n".join(text_markdown(records)).replace("\\", "")
    section = md.split("### ", 1)[1]
    page = html.unescape(re.sub(r"<[^>]+>", "", text_section(records)))
    for shown in (section, page):
        assert "nothing recovered" in shown.lower(), shown
        for verse in VERSES:
            assert verse in shown.replace("**", ""), (verse, shown)
        for reason in WHY.values():
            assert reason in shown, (reason, shown)
        assert "failed" not in shown.lower()
