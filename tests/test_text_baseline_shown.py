"""summary.md and report.html show the bag baseline's ROUGE-L, the one stdout (fedsim.metrics.text's summary line),
the tutorial and docs/text.md compare DAGER/TAG against (QA: the reports showed only its ROUGE-1)."""

from __future__ import annotations

import html
import re

import torch

from fedsim.attacking import AttackOutcome
from fedsim.report.text import text_markdown, text_records, text_section


def test_reports_show_the_bag_baseline_rougeL() -> None:
    truth = torch.tensor([[5, 6, 7, 8], [9, 6, 7, 5]])
    o = AttackOutcome(attack="dager", attack_index=0, round=1, partition_id=0,
                      metrics={"rougeL_mean": 1.0, "bag_baseline_rouge1_mean": 0.312,
                               "bag_baseline_rougeL_mean": 0.2037}, stats={}, seconds=0.1, tokens=truth.clone(),
                      truth_tokens=truth)
    records = text_records([o], "")
    md = "\n".join(text_markdown(records))
    head = next(line for line in md.splitlines() if line.startswith("| attack |"))
    row = next(line for line in md.splitlines() if line.startswith("| dager |"))
    titles = [c.strip() for c in head.split("|")]
    assert "baseline ROUGE-L" in titles, head
    assert [c.strip() for c in row.split("|")][titles.index("baseline ROUGE-L")] == "0.204", row
    page = html.unescape(re.sub(r"<[^>]+>", "", text_section(records)))
    assert "baseline ROUGE-L 0.204" in page, page
