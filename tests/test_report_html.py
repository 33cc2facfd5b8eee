"""`fedsim report`: the self-contained HTML report of a run or bench directory, its leaderboard and frontier.

A module-scoped tiny run (bundled 8x8 digits, in-process, 5 attack iterations) and a real DP-SGD run are
the raw material; a bench directory is fabricated from them plus hand-written cells.jsonl lines in the
shared bench format (one ok repeat without a run directory, one failed cell, a truncated last line).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from fedsim.attacking import AttackOutcome
from fedsim.cli import app
from fedsim.data import load_dataset
from fedsim.report import write_run_dir
from fedsim.report.frontier import frontier_plot, pareto_front
from fedsim.report.html import render_report
from fedsim.report.loading import Cell, load_metrics, load_source, read_cells, summarize_metrics
from fedsim.report.tables import CSV_HEAD, METRICS, leaderboard, write_leaderboard_csv
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario

SECTIONS = ("header", "how-to-read", "leaderboard", "frontier", "rounds", "galleries")
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _raw(**changes) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real tiny run: IG on client 0 in rounds 1 and 2 (two outcomes, 4 digits each); hostile description."""
    raw = _raw(description="<script>alert('x')</script> & <b>co</b>")
    raw["attacks"][0].update(rounds=[1, 2], clients=[0])
    return run_scenario(parse_scenario(raw), tmp_path_factory.mktemp("run") / "tiny").out_dir


@pytest.fixture(scope="module")
def dp_run_dir(tmp_path_factory) -> Path:
    raw = _raw(defenses=[{"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}])
    return run_scenario(parse_scenario(raw), tmp_path_factory.mktemp("dp") / "tiny-dp").out_dir


def _record(cell_id: str, attack: str, defense: str, repeat: int, status: str = "ok", run_dir: str | None = None,
            summary: dict | None = None, error: str | None = None, params: dict | None = None) -> dict:
    return {"cell_id": cell_id, "attack": attack, "defense": defense, "params": params or {}, "repeat": repeat,
            "seed": 7 + repeat, "status": status, "error": error, "seconds": 1.5, "run_dir": run_dir,
            "summary": summary or {}}


def make_bench(root: Path, runs: dict[str, tuple[Path, str]], extra: list[dict], tail: str = "") -> Path:
    """A bench directory in the shared format: each real run copied to cells/<id>, its summary computed from its
    metrics.json; then the hand-written records; then ``tail`` written without a newline (a cut-off cell)."""
    (root / "cells").mkdir(parents=True)
    (root / "grid.yaml").write_text("name: tiny-grid\nrepeats: 2\n")
    lines = []
    for cell_id, (src, defense) in runs.items():
        shutil.copytree(src, root / "cells" / cell_id)
        summary = summarize_metrics(load_metrics(src))
        lines.append(_record(cell_id, "inverting_gradients", defense, 0, run_dir=f"cells/{cell_id}", summary=summary))
    lines += extra
    (root / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return root


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, run_dir, dp_run_dir) -> Path:
    extra = [
        _record("hand-ig-1", "inverting_gradients", "none", 1, summary={"psnr_mean": 9.0, "ssim_mean": 0.2,
                "label_acc": 0.5, "attacks_failed": 0, "test_accuracy": 0.3, "epsilon": None, "rounds": 2}),
        _record("hand-dp-1", "inverting_gradients", "dp_sgd", 1, status="failed", error="RuntimeError: boom"),
    ]
    return make_bench(tmp_path_factory.mktemp("bench") / "b", {"c-none": (run_dir, "none"),
                                                                  "c-dp": (dp_run_dir, "dp_sgd")},
                      extra, tail='{"cell_id": "cut-off", "attack": "dl')


def _assert_self_contained(doc: str) -> None:
    assert not re.search(r"https?://", doc), "the report must not reference anything outside itself"
    assert "<script" not in doc.lower() and "<link" not in doc.lower()
    for payload in DATA_URI.findall(doc)[:3]:
        import base64

        assert base64.b64decode(payload)[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_run_dir_writes_report_and_reconstructions(run_dir: Path) -> None:
    assert (run_dir / "report.html").is_file() and (run_dir / "report" / "leaderboard.csv").is_file()
    assert not list(run_dir.parent.glob("*.partial"))
    metrics = load_metrics(run_dir)
    with np.load(run_dir / "reconstructions.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        assert [(m["attack"], m["round"], m["client"]) for m in meta] == [("inverting_gradients", 1, 0),
                                                                          ("inverting_gradients", 2, 0)]
        truth, recon = data["truth_0"], data["recon_0"]
        assert truth.dtype == np.uint8 and truth.shape == (4, 1, 8, 8) and recon.shape == (4, 1, 8, 8)
        assert truth.std() > 10  # real digits, not a blank placeholder
        assert data["order_0"].tolist() == metrics["attacks"][0]["metrics"]["order"]
    # the truth stored is the client's real batch: rescoring it against the stored reconstruction, in the
    # stored order, gives the recorded per-image PSNR (up to uint8 rounding)
    t, r = truth.astype(np.float64) / 255, recon.astype(np.float64) / 255
    for c, idx in enumerate(metrics["attacks"][0]["metrics"]["order"]):
        psnr = 10 * math.log10(1 / np.mean((t[c] - r[idx]) ** 2))
        assert abs(psnr - metrics["attacks"][0]["metrics"]["psnr_per_image"][c]) < 0.3


def test_run_report_has_sections_embedded_images_and_escaped_text(run_dir: Path) -> None:
    doc = (run_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in doc, section
    # frontier + leakage-over-rounds + utility figures, and 2 outcomes x 4 real + 4 reconstructed images
    assert len(DATA_URI.findall(doc)) >= 3 + 16
    _assert_self_contained(doc)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;co&lt;/b&gt;" in doc
    metrics = load_metrics(run_dir)
    for outcome in metrics["attacks"]:
        for value in outcome["metrics"]["psnr_per_image"]:
            assert f"{value:.1f} dB" in doc  # per-image PSNR under each matched reconstruction
    psnr = summarize_metrics(metrics, 0)["psnr_mean"]
    assert f"<td class=\"\">{psnr:.2f}</td>" in doc
    assert "labels infer" in doc  # the attack's declared knowledge is the threat model shown


def _cell(attack: str, defense: str, repeat: int, status: str = "ok", **summary) -> Cell:
    return Cell(f"{attack}-{defense}-{repeat}", attack, defense, {}, repeat, repeat, status,
                None if status == "ok" else "RuntimeError: boom", 1.0, None, summary)


def test_leaderboard_mean_std_sorting_and_failed_cells(tmp_path: Path) -> None:
    cells = [
        _cell("ig", "none", 0, psnr_mean=10.0, ssim_mean=0.2, test_accuracy=0.50, attacks_failed=0),
        _cell("ig", "none", 1, psnr_mean=14.0, ssim_mean=0.4, test_accuracy=0.70, attacks_failed=1),
        _cell("ig", "none", 2, status="failed"),
        _cell("ig", "dp_sgd", 0, psnr_mean=8.0, test_accuracy=0.3, epsilon=4.0, attacks_failed=0),
        _cell("mi", "none", 0, mi_accuracy=0.9, knn_distance=1.5, test_accuracy=0.5),
        _cell("dlg", "none", 0, psnr_mean=22.0, test_accuracy=0.5),
        _cell("dlg", "soteria", 0, status="failed"),
    ]
    rows = leaderboard(cells)
    assert [(r.attack, r.defense) for r in rows] == [("dlg", "none"), ("ig", "none"), ("ig", "dp_sgd"),
                                                     ("mi", "none"), ("dlg", "soteria")]
    ig = rows[1]
    assert (len(ig.cells), ig.ok, ig.failed, ig.attacks_failed) == (3, 2, 1, 1)
    assert ig.stats["psnr_mean"].mean == pytest.approx(12.0) and ig.stats["psnr_mean"].n == 2
    assert ig.stats["psnr_mean"].std == pytest.approx(math.sqrt(8.0))  # sample std of 10 and 14
    assert ig.stats["test_accuracy"].mean == pytest.approx(0.6)
    assert ig.stats["test_accuracy"].std == pytest.approx(math.sqrt(0.02))
    assert rows[2].stats["epsilon"].mean == 4.0 and rows[2].stats["epsilon"].std is None
    assert rows[4].failed == 1 and rows[4].ok == 0 and not rows[4].stats  # counted, not dropped

    path = write_leaderboard_csv(rows, tmp_path / "leaderboard.csv")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_HEAD + [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std")] + [
                "diverged", "diverged_reason", "attacks_not_attacked", "attacks_time_limited"]
        table = list(reader)
    assert len(table) == 5
    assert float(table[1]["psnr_mean_mean"]) == pytest.approx(12.0)
    assert float(table[1]["psnr_mean_std"]) == pytest.approx(math.sqrt(8.0))
    assert (table[1]["cells"], table[1]["ok"], table[1]["failed"]) == ("3", "2", "1")
    assert table[3]["mi_accuracy_mean"] == "0.9" and table[3]["psnr_mean_mean"] == ""
    assert table[4]["failed"] == "1"


def test_pareto_front_and_frontier_with_and_without_epsilon(tmp_path: Path) -> None:
    # (accuracy, PSNR): (0.4, 15) is dominated by (0.5, 10): less accurate and more leaking
    assert pareto_front([(0.9, 20.0), (0.5, 10.0), (0.4, 15.0), (0.95, 25.0)]) == [1, 0, 3]
    plain = leaderboard([_cell("ig", "none", 0, psnr_mean=18.0, test_accuracy=0.6),
                         _cell("dlg", "none", 0, psnr_mean=14.0, test_accuracy=0.6),
                         _cell("ig", "gaussian_noise", 0, psnr_mean=11.0, test_accuracy=0.5)])
    with_eps = leaderboard([*(r.cells[0] for r in plain), _cell("ig", "dp_sgd", 0, psnr_mean=9.0, test_accuracy=0.4,
                                                             epsilon=3.2)])
    sizes = []
    for name, rows in (("plain", plain), ("eps", with_eps)):
        assert frontier_plot(rows, tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as img:
            sizes.append(img.size)
            assert min(img.size) > 300
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "eps.png").read_bytes()
    # rows without a test accuracy (or without PSNR: model inversion) give no frontier, and no file
    assert not frontier_plot(leaderboard([_cell("mi", "none", 0, mi_accuracy=0.8, test_accuracy=0.5)]),
                             tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_bench_dir_with_truncated_last_line_renders(bench_dir: Path) -> None:
    source = load_source(bench_dir)
    assert source.kind == "bench" and source.truncated_tail and not source.skipped_lines
    assert sorted(c.cell_id for c in source.cells) == ["c-dp", "c-none", "hand-dp-1", "hand-ig-1"]
    out = render_report(bench_dir)
    assert out == bench_dir / "report.html"
    doc = out.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in doc, section
    _assert_self_contained(doc)
    assert "Failed cells" in doc and "RuntimeError: boom" in doc and "cut off" in doc
    rows = {(r["attack"], r["defense"]): r for r in csv.DictReader((bench_dir / "report" / "leaderboard.csv").open())}
    real = summarize_metrics(load_metrics(bench_dir / "cells" / "c-none"))["psnr_mean"]
    assert float(rows[("inverting_gradients", "none")]["psnr_mean_mean"]) == pytest.approx((real + 9.0) / 2)
    dp = rows[("inverting_gradients", "dp_sgd")]
    assert (dp["cells"], dp["failed"]) == ("2", "1")
    eps = summarize_metrics(load_metrics(bench_dir / "cells" / "c-dp"))["epsilon"]
    assert eps is not None and float(dp["epsilon_mean"]) == pytest.approx(eps)
    assert f"{eps:.2f}" in doc
    assert doc.count('class="gallery"') == 2  # one gallery per attack x defense row
    for name in ("frontier.png", "rounds.png", "gallery_00.png", "gallery_01.png"):
        assert (bench_dir / "report" / name).is_file(), name


def test_read_cells_tolerates_cut_tail_and_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    path.write_text('{"cell_id": "a"}\nnot json\n{"cell_id": "b"}\n{"cell_id": "c", "sta')
    records, bad, cut = read_cells(path)
    assert [r["cell_id"] for r in records] == ["a", "b"] and bad == [2] and cut
    path.write_text('{"cell_id": "a"}\n{"cell_id": "b", "st\n')  # last line invalid though newline-terminated
    records, bad, cut = read_cells(path)
    assert [r["cell_id"] for r in records] == ["a"] and bad == [] and cut


def test_cli_report_prints_the_path_and_exits_2_on_bad_directories(tmp_path: Path, run_dir: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "elsewhere" / "r.html"
    out.parent.mkdir()
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out) and out.is_file()
    assert (tmp_path / "elsewhere" / "r" / "frontier.png").is_file()  # assets beside the HTML, same name
    empty = tmp_path / "empty"
    empty.mkdir()
    only_cut = tmp_path / "cut"
    only_cut.mkdir()
    (only_cut / "cells.jsonl").write_text('{"cell_id": "x", "att')
    for bad in (empty, tmp_path / "missing", only_cut):
        result = runner.invoke(app, ["report", str(bad)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and str(bad) in result.output
        assert "Traceback" not in result.output
        assert not (bad / "report.html").exists()


def test_model_inversion_outcome_shows_inverted_images_with_target_class(tmp_path: Path, tiny_raw) -> None:
    scenario = parse_scenario(tiny_raw)
    bundle = load_dataset(scenario.data)
    images = bundle.train_x[:3].clone()  # real digits stand in for the inverted class images
    inverted = AttackOutcome(attack="model_inversion", attack_index=0, round=2, partition_id=-2,
                             metrics={"mi_accuracy": 0.67, "knn_distance": 1.25, "target_classes": [3, 5, 7]},
                             stats={}, seconds=0.1, reconstruction=images, truth=None)
    history = [{"round": 0, "test_loss": 2.3, "test_accuracy": 0.1},
               {"round": 2, "test_loss": 2.0, "test_accuracy": 0.4}]
    out = write_run_dir(tmp_path / "mi", scenario, history, [inverted], {"federation_s": 0.1, "attacks_s": 0.1})
    doc = (out / "report.html").read_text()
    for label in ("class 3", "class 5", "class 7", "MI acc.", "MI accuracy 0.67", "kNN dist."):
        assert label in doc, label
    assert 'class="rowlab">real<' not in doc  # no truth row: there is no private image to compare with
    assert "no frontier to draw" in doc
    with np.load(out / "reconstructions.npz", allow_pickle=False) as data:
        assert data["labels_0"].tolist() == [3, 5, 7] and "truth_0" not in data.files
        assert data["recon_0"].shape == (3, 1, 8, 8)
        assert np.array_equal(data["recon_0"], torch.round(images * 255).to(torch.uint8).numpy())


def test_an_unusable_cell_record_is_reported_not_fatal(tmp_path: Path) -> None:
    """A record that parses as JSON but cannot be used (a non-integer repeat) is listed as a bad line;
    the other cells still make a report."""
    bench = tmp_path / "bench"
    bench.mkdir()
    good = {"cell_id": "a", "attack": "inverting_gradients", "defense": "none", "params": {}, "repeat": 0,
            "seed": 1, "status": "ok", "error": None, "seconds": 1.0, "run_dir": None,
            "summary": {"psnr_mean": 12.0, "test_accuracy": 0.5}}
    (bench / "cells.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "cell_id": "b", "repeat": "x"})
                                       + "\n")
    source = load_source(bench)
    assert [c.cell_id for c in source.cells] == ["a"] and source.skipped_lines == [2]
    assert render_report(bench).is_file()


def test_the_grad_sample_mode_that_ran_is_shown_beside_the_setting(dp_run_dir: Path) -> None:
    """QA F5: dp_sgd asks ``grad_sample_mode: auto`` (the default); the tiny MLP holds only Linear layers, all of
    which book-keeping clips (defenses/bk_clipping.SUPPORTED), so auto runs bk: summary.md and report.html say
    ``auto -> bk``, not only the setting."""
    from fedsim.defenses.bk_clipping import SUPPORTED
    from fedsim.models import build_model

    model = build_model(parse_scenario(TINY).model, (1, 8, 8), 10)
    assert all(isinstance(m, SUPPORTED) for m in model.modules() if list(m.parameters(recurse=False)))
    assert load_metrics(dp_run_dir)["privacy"]["dp_sgd"]["grad_sample_mode"] == "bk"
    render_report(dp_run_dir)
    for name in ("summary.md", "report.html"):
        text = (dp_run_dir / name).read_text()
        assert "per-example gradients (grad_sample_mode): auto \u2192 bk" in text, name


def test_a_time_limited_attack_is_marked_in_every_output(run_dir: Path, tmp_path: Path, capsys) -> None:
    """QA F9: an outcome whose attack hit ``budget.time_limit_s`` (stats ``time_limited`` 1) is scored, and the
    console line, summary.md, report.html, the bench cell line and leaderboard.csv all mark it."""
    from types import SimpleNamespace

    from fedsim.bench.cli import _describe
    from fedsim.bench.store import summarize_run
    from fedsim.cli import _print_result
    from fedsim.report.summary import summary_markdown

    copy_dir = tmp_path / "limited"
    shutil.copytree(run_dir, copy_dir)
    metrics = json.loads((copy_dir / "metrics.json").read_text())
    metrics["attacks"][0]["stats"].update(time_limited=1.0, iterations=4.0)
    (copy_dir / "metrics.json").write_text(json.dumps(metrics))
    o = metrics["attacks"][0]
    outcome = SimpleNamespace(attack=o["attack"], oracle=False, round=o["round"], partition_id=o["client"],
                              failed=None, metrics=o["metrics"], stats=o["stats"], oracle_labels=False, seconds=0.3,
                              truth=None, staleness=0, threat_model="", manipulated_by=None)
    _print_result(SimpleNamespace(history=[], client_failures=[], outcomes=[outcome], out_dir=None,
                                  timing={"federation_s": 0.0, "attacks_s": 0.0}))
    want = "time-limited: budget.time_limit_s stopped it after 4 iteration(s)"
    shown = {"console": capsys.readouterr().out,
             "summary.md": summary_markdown(parse_scenario(TINY), [], [outcome], {}, {}),
             "report.html": render_report(copy_dir).read_text(),
             "bench line": _describe({"attack": "ig", "defense": "none", "params": {}, "repeat": 0, "status": "ok",
                                      "seconds": 1.0, "summary": summarize_run(metrics)})}
    assert want in shown["console"] and want in shown["summary.md"]
    assert "(time-limited)" in shown["summary.md"]  # on the row itself, beside the PSNR
    assert "time-limited 1</span>" in shown["report.html"]
    assert "TIME-LIMITED: 1 attack run(s)" in shown["bench line"]
    with (copy_dir / "report" / "leaderboard.csv").open(newline="") as fh:
        assert [r["attacks_time_limited"] for r in csv.DictReader(fh)] == ["1"]
    from fedsim.report.gallery import load_reconstructions, save_reconstructions
    from fedsim.report.html import _gallery

    truth = torch.from_numpy(np.load(run_dir / "reconstructions.npz")["truth_0"]).float() / 255
    outcome.truth = outcome.reconstruction = truth  # the outcome's own gallery entry, through reconstructions.npz
    outcome.attack_index = 0
    save_reconstructions([outcome], tmp_path / "r.npz")
    assert want in _gallery(load_reconstructions(tmp_path / "r.npz")[0], "a", tmp_path, 0)
    untouched = render_report(run_dir).read_text()  # the same run without the limit: no mark anywhere
    assert "time-limited" not in untouched and "time-limited" not in (run_dir / "summary.md").read_text()
