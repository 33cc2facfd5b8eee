"""Text attacks in summary.md and report.html (fedsim/report/text.py): the client's sequences beside the recovered
ones, a token equal to the truth at its position marked, everything escaped (a verse with ``<script>`` and ``&``),
the bag of a token_set outcome against the client's, and a failed text attack shown with its reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from text_support import tiny_text

from fedsim.attacking import AttackOutcome
from fedsim.report.text import html_tokens, md_tokens, text_markdown, text_records, text_section
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario
from fedsim.text.tokenizer import decode_tokens, encode

TOK = "kjv-bpe-2048"
EVIL = "And he said <script>alert(1)</script> & wept"


def outcome(truth: torch.Tensor, tokens: torch.Tensor | None = None, token_set: torch.Tensor | None = None,
            **metrics: object) -> AttackOutcome:
    return AttackOutcome(attack="dager", attack_index=0, round=1, partition_id=2, metrics=dict(metrics), stats={},
                         seconds=0.5, tokens=tokens, truth_tokens=truth, token_set=token_set)


def test_sentences_are_escaped_in_html_and_markdown() -> None:
    ids = torch.tensor([encode(TOK, EVIL)])
    records = text_records([outcome(ids, ids.clone(), rougeL_mean=1.0)], TOK)
    page = text_section(records)
    assert "<script>" not in page and "</script>" not in page
    assert "&lt;" in page and "&amp;" in page
    # the page's text, tags removed and entities decoded, reads the verse (twice: original and recovered)
    import html as html_lib
    shown = html_lib.unescape(re.sub(r"<[^>]+>", "", page))
    assert shown.count(EVIL) == 2, shown
    md = "\n".join(text_markdown(records))
    assert "<script>" not in md and "\\<script\\>" in md.replace("**", "")


def test_tokens_equal_to_the_truth_at_their_position_are_marked() -> None:
    truth_ids = encode(TOK, "In the beginning was the Word")
    wrong = encode(TOK, "Jerusalem")[0]
    rec_ids = [wrong if i % 2 else t for i, t in enumerate(truth_ids)]  # even positions right, odd wrong
    rec_ids[-1] = -1  # unfilled
    records = text_records([outcome(torch.tensor([truth_ids]), torch.tensor([rec_ids]), order=[0])], TOK)
    pair = records[0]["pairs"][0]
    want = [i % 2 == 0 and i < len(truth_ids) - 1 for i in range(len(truth_ids))]
    assert pair["match"] == want
    cell = html_tokens(pair["recovered"], pair["match"])
    marked = re.findall(r"<mark>(.*?)</mark>", cell)
    strings = decode_tokens(TOK, truth_ids)
    assert marked == [strings[i] for i, w in enumerate(want) if w]
    assert "\u25af" in cell  # the unfilled position
    assert md_tokens(pair["recovered"], pair["match"]).count("**") == 2 * sum(want)  # runs of one token each


def test_the_matching_order_pairs_each_truth_with_its_recovered_row() -> None:
    a, b = encode(TOK, "Jesus wept"), encode(TOK, "God is love")
    n = min(len(a), len(b))
    truth = torch.tensor([a[:n], b[:n]])
    records = text_records([outcome(truth, torch.tensor([b[:n], a[:n]]), order=[1, 0])], TOK)
    assert [p["match"] for p in records[0]["pairs"]] == [[True] * n, [True] * n]


def test_a_token_set_outcome_shows_its_bag_against_the_clients() -> None:
    truth = torch.tensor([encode(TOK, "Jesus wept")])
    used = sorted(set(truth.flatten().tolist()))
    extra = next(i for i in range(2048) if i not in used)
    found = torch.tensor(used[1:] + [extra])  # one missed, one not used by the client
    records = text_records([outcome(truth, token_set=found, token_set_precision=0.5)], TOK)
    bag = records[0]["bag"]
    assert bag["hit"].count(False) == 1 and bag["missed"] == decode_tokens(TOK, [used[0]])
    page = text_section(records)
    assert "wrong" in page and "missed (1)" in page and "<table" not in page  # no sequences to pair


def test_a_failed_text_attack_is_visible_in_every_output(tmp_path: Path) -> None:
    raw = tiny_text("gpt", attacks=[{"name": "dager"}, {"name": "token_set"}])  # depth 1: dager needs 2 blocks
    out = run_scenario(parse_scenario(raw), out_dir=tmp_path / "run").out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    reason = metrics["attacks"][0]["failed"]
    assert reason and "2 blocks" in reason, metrics["attacks"]
    summary = (out / "summary.md").read_text()
    page = (out / "report.html").read_text()
    assert "attack failed" in summary and "2 blocks" in summary
    assert "attack failed" in page and "2 blocks" in page
    assert "bag P" in page and "token\\_set" in summary  # the attack that ran is shown too


def test_no_sentences_are_written_without_save_images(tmp_path: Path) -> None:
    raw = tiny_text("gpt", attacks=[{"name": "token_set"}], output={"save_images": False})
    out = run_scenario(parse_scenario(raw), out_dir=tmp_path / "run").out_dir
    records = json.loads((out / "sentences.json").read_text())["outcomes"]
    assert records and not records[0]["pairs"] and records[0]["bag"] is None
    assert "not saved" in (out / "summary.md").read_text() and "not saved" in (out / "report.html").read_text()


def test_a_bench_of_text_attacks_shows_each_rows_sentences(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedsim.cli import app
    from fedsim.report.html import render_report

    base = tiny_text("gpt")
    base["model"]["depth"] = 2
    grid = {"name": "textbench", "base": base, "attacks": ["token_set", "dager"], "defenses": ["none"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(path), "--out", str(out), "--executor", "serial"])
    assert result.exit_code == 0, result.output
    page = render_report(out).read_text()
    assert "token_set \u00b7" in page and "dager \u00b7" in page  # one text block per row
    assert "recovered bag" in page and "<table class=\"text\">" in page  # token_set's bag, dager's pairs
    assert "no images" not in page


def test_a_time_limited_text_attack_is_marked_in_markdown_and_html() -> None:
    """QA F9 for text runs: DAGER stopped by budget.time_limit_s (stats time_limited 1) is marked in summary.md's
    text section and report.html's; the same outcome without the limit is not."""
    from fedsim.report.text import text_outcomes_html

    ids = torch.tensor([encode(TOK, "a b c")])
    limited = outcome(ids, ids.clone(), rougeL_mean=1.0)
    limited.stats.update(time_limited=1.0, partial="budget.time_limit_s reached after 8 starts")
    for o, marked in ((limited, True), (outcome(ids, ids.clone(), rougeL_mean=1.0), False)):
        records = text_records([o], TOK)
        for text in ("\n".join(text_markdown(records)), text_outcomes_html(records)):
            assert ("time-limited: budget" in text and "depends on wall time" in text) is marked, text
