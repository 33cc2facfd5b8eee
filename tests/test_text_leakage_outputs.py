"""Text leakage reaches every output that image leakage reaches (issue 16, QA findings 5 and 6).

Kind 1: metric-name lists written for images only (the bench store's LEAKAGE_KEYS, the leakage-over-rounds
CURVE_METRICS, the leaderboard's METRICS and its PSNR ranking, the bench console line, the plots' PSNR axes, the
"How to read" section) made a text attack's ROUGE / exact-sequence / bag numbers vanish. They now all read one
registry (fedsim.headline); these tests run text attacks through bench and run outputs and compare what comes out
with means computed here from the runs' own per-outcome metrics.

Kind 2: bag precision/recall had no trivial attacker that never saw the update. The public-bag baseline (the
public corpus's most frequent ids, as many as the batch has distinct ones) is checked against a Counter computed
here over the public sequences.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import mean

import pytest
import torch
import yaml
from text_support import VOCAB, tiny_text

from fedsim.headline import LEAKAGE_KEYS, TEXT_KEYS, direction
from fedsim.metrics.text import TEXT_METRIC_DIRECTIONS, score_text

TEXT_SUMMARY = ("exact_seq_rate", "rouge1_mean", "rouge2_mean", "rougeL_mean", "token_precision", "token_recall",
                "token_set_precision", "token_set_recall")


def _public(seq_len: int) -> torch.Tensor:
    """A skewed public corpus for tiny-text (ids 0..9 far more frequent than the rest), disjoint by construction
    from nothing in particular: what matters is that its frequency ranking is known here."""
    gen = torch.Generator().manual_seed(11)
    common = torch.randint(0, 10, (48, seq_len), generator=gen)
    rare = torch.randint(0, VOCAB, (16, seq_len), generator=gen)
    return torch.cat([common, rare])


@pytest.fixture
def tiny_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-text gets a public corpus (fedsim.data.text.PUBLIC_PARTS) for this test only; the ranking cache is
    emptied before and after so no other test sees it."""
    import fedsim.data.text as data_text
    import fedsim.metrics.text as metrics_text

    monkeypatch.setitem(data_text.PUBLIC_PARTS, "tiny-text", lambda spec, seq_len: _public(seq_len))
    monkeypatch.setattr(metrics_text, "_PUBLIC_RANKINGS", {})


def _expected_public_bag(public: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(P, R) of guessing the |S| most frequent public ids (ties: smaller id), computed independently."""
    counts = Counter(public.flatten().tolist())
    true_set = set(truth.flatten().tolist())
    guess = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:len(true_set)]
    hit = len(set(guess) & true_set)
    return hit / len(guess), hit / len(true_set)


# -- the registry ------------------------------------------------------------------------------------------------

def test_every_text_metric_is_in_the_registry_with_its_direction() -> None:
    from fedsim.report.tables import METRICS

    columns = {key: sign for key, _, sign in METRICS}
    for name, how in TEXT_METRIC_DIRECTIONS.items():
        key = f"{name}_mean" if name.startswith("rouge") else name
        assert key in TEXT_KEYS and key in LEAKAGE_KEYS, key
        assert direction(key) == (+1 if how == "higher leaks more" else -1)
        assert columns.get(key) == direction(key), key  # a leaderboard column, same direction
    for key in ("public_bag_baseline_token_set_precision", "public_bag_baseline_token_set_recall"):
        assert key in LEAKAGE_KEYS and direction(key) == 0 and columns.get(key) == 0  # a baseline, not leakage


def test_leaderboard_ranks_text_rows_by_exact_sequences_then_rouge_l() -> None:
    from fedsim.report.loading import Cell
    from fedsim.report.tables import leaderboard

    def cell(attack: str, **summary: float) -> Cell:
        return Cell(cell_id=attack, attack=attack, defense="none", params={}, repeat=0, seed=0, status="ok",
                    error=None, seconds=1.0, run_dir=None, summary=dict(summary))

    cells = [cell("a_bag_only", token_set_precision=1.0, token_set_recall=1.0),
             cell("b_low_exact", exact_seq_rate=0.25, rougeL_mean=0.9, token_set_recall=1.0),
             cell("c_tie_low_rouge", exact_seq_rate=0.5, rougeL_mean=0.6, token_set_recall=1.0),
             cell("d_tie_high_rouge", exact_seq_rate=0.5, rougeL_mean=0.7, token_set_recall=0.5)]
    order = [r.attack for r in leaderboard(cells)]
    # by hand: exact 0.5 (ROUGE-L 0.7 before 0.6), then exact 0.25, then the bag-only row (no exact sequences)
    assert order == ["d_tie_high_rouge", "c_tie_low_rouge", "b_low_exact", "a_bag_only"]


# -- kind 1: bench, leaderboard, report ------------------------------------------------------------------------

def test_a_text_bench_records_and_reports_text_leakage(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsim.bench.store import read_records
    from fedsim.cli import app
    from fedsim.report.html import render_report

    base = tiny_text("gpt")
    base["model"]["depth"] = 2
    grid = {"name": "textleak", "base": base, "attacks": ["token_set", "dager"], "defenses": ["none"]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "grid.yaml"), "--out", str(out), "--executor",
                                      "serial"])
    assert result.exit_code == 0, result.output
    assert "no PSNR" not in result.output and "no leakage metric" not in result.output
    records = {r["attack"]: r for r in read_records(out / "cells.jsonl")}
    assert set(records) == {"token_set", "dager"} and all(r["status"] == "ok" for r in records.values())
    for attack, record in records.items():
        metrics = json.loads((out / record["run_dir"] / "metrics.json").read_text())
        good = [o["metrics"] for o in metrics["attacks"] if not o["failed"]]
        assert good, attack
        for key in TEXT_SUMMARY:  # every text metric the outcomes have reaches the cell, as their mean
            values = [m[key] for m in good if isinstance(m.get(key), int | float)]
            if values:
                assert record["summary"][key] == pytest.approx(mean(values)), (attack, key)
        assert "token_set_recall" in record["summary"], attack
    assert "exact_seq_rate" in records["dager"]["summary"] and "rougeL_mean" in records["dager"]["summary"]
    assert "bag P/R" in result.output  # the console line of each cell
    page = render_report(out).read_text()
    board = (out / "report" / "leaderboard.csv") if (out / "report").is_dir() else None
    assert "ROUGE-L" in page and "exact seq." in page and "bag R" in page  # leaderboard columns
    assert "exact sequences, then ROUGE-L" in page  # the ranking named
    assert "public-bag baseline" in page and "share &gt; 40 dB" not in page  # How to read, in text terms
    csvs = list(out.rglob("leaderboard.csv")) if board is None else [board]
    assert csvs
    rows = {row["attack"]: row for row in __import__("csv").DictReader(csvs[0].open())}
    assert float(rows["dager"]["exact_seq_rate_mean"]) == pytest.approx(records["dager"]["summary"]["exact_seq_rate"])
    assert float(rows["token_set"]["token_set_recall_mean"]) == pytest.approx(
        records["token_set"]["summary"]["token_set_recall"])


# -- kind 1: leakage over rounds; kind 2: the public-bag baseline in a run ----------------------------------------

def test_a_text_run_has_a_text_leakage_curve_and_the_public_bag_baseline(tmp_path: Path, tiny_public: None) -> None:
    from fedsim.report.html import render_report
    from fedsim.run import run_scenario
    from fedsim.scenario import parse_scenario

    raw = tiny_text("gpt")
    raw["model"]["depth"] = 2
    raw["federation"]["rounds"] = 2
    raw["attacks"] = [{"name": "token_set", "every": 1, "clients": [0]}, {"name": "dager", "every": 1, "clients": [0]}]
    result = run_scenario(parse_scenario(raw), tmp_path / "run")
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    curve = metrics["leakage"]
    for attack in ("token_set", "dager"):
        for rnd in (1, 2):
            row = next(r for r in curve if r["attack"] == attack and r["round"] == rnd)
            outs = [o for o in result.outcomes if o.attack == attack and o.round == rnd and not o.failed]
            assert outs, (attack, rnd)
            for key in ("token_set_precision", "token_set_recall", "exact_seq_rate", "rougeL_mean"):
                values = [o.metrics[key] for o in outs if key in o.metrics]
                if values:
                    assert row[key] == pytest.approx(mean(values)), (attack, rnd, key)
            assert "token_set_recall" in row
    assert (result.out_dir / "leakage_rounds.png").is_file()  # a text curve is drawn (left axis ROUGE-L)
    summary = (result.out_dir / "summary.md").read_text()
    assert "leakage_rounds.png" in summary
    page = render_report(result.out_dir).read_text()
    assert "Mean ROUGE-L of each attack per attacked round" in page
    # kind 2: the update-free baseline, checked against an independent Counter over the public sequences
    public = _public(int(result.outcomes[0].truth_tokens.shape[1]))
    for o in result.outcomes:
        if o.failed:
            continue
        p, r = _expected_public_bag(public, o.truth_tokens)
        assert o.metrics["public_bag_baseline_token_set_precision"] == pytest.approx(p)
        assert o.metrics["public_bag_baseline_token_set_recall"] == pytest.approx(r)
    assert "public-bag baseline P" in summary and "public-bag baseline" in page


def test_public_bag_baseline_matches_a_counter_over_the_public_corpus() -> None:
    gen = torch.Generator().manual_seed(5)
    public = torch.cat([torch.randint(0, 6, (40, 8), generator=gen), torch.randint(0, 50, (40, 8), generator=gen)])
    from fedsim.metrics.text import public_ranking

    ranking = public_ranking(public)
    for seed in range(5):
        truth = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(seed))
        out = score_text(None, torch.tensor([1, 2, 3]), truth, public=ranking)
        p, r = _expected_public_bag(public, truth)
        assert out["public_bag_baseline_token_set_precision"] == pytest.approx(p)
        assert out["public_bag_baseline_token_set_recall"] == pytest.approx(r)
        assert 0.0 < p < 1.0  # a real, non-trivial reference at this skew
    assert "public_bag_baseline_token_set_recall" not in score_text(None, torch.tensor([1]), truth)  # no corpus


def test_the_console_line_shows_the_public_bag_baseline() -> None:
    from fedsim.metrics.text import text_line

    line = text_line({"token_set_precision": 1.0, "token_set_recall": 0.9,
                      "public_bag_baseline_token_set_precision": 0.33, "public_bag_baseline_token_set_recall": 0.33})
    assert "bag P/R 1.00/0.90 (public-bag baseline 0.33/0.33)" in line
