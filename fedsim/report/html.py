"""``render_report``: one self-contained HTML report of a run or benchmark directory (issue #7).

The page embeds every image as a base64 PNG data URI and its stylesheet inline (no script, no CDN), so
it can be mailed or archived as one file. Beside it, in a folder of the same name, go the same PNGs and
``leaderboard.csv``. Both are written atomically (temporary name, then rename). An existing HTML file
is replaced only when fedsim wrote it (:data:`fedsim.report.page.GENERATOR`), an existing folder only
when it carries fedsim's marker or is empty (:mod:`fedsim.outputs`); anything else is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError
from fedsim.outcomes import was_not_attacked
from fedsim.outputs import REPORT_ASSETS, check_replaceable, fresh_partial, remove_owned
from fedsim.recovery import EXACT_LABEL, exact_count
from fedsim.report.audit import audit_section
from fedsim.report.client_checks import client_checks_section
from fedsim.report.divergence import divergence_note
from fedsim.report.dp_frontier_section import dp_frontier_section
from fedsim.report.figures import utility_curve
from fedsim.report.frontier import frontier_key, frontier_plot, setting_label
from fedsim.report.gallery import GalleryEntry, data_uri, load_reconstructions, png_bytes, strip_png
from fedsim.report.leakage import leakage_plot, plotted_key
from fedsim.report.loading import ReportSourceError, Source, load_metrics, load_source, read_yaml
from fedsim.report.manipulation import manipulation_section
from fedsim.report.page import esc, figure, is_fedsim_report, num, page
from fedsim.report.participation import participation_section
from fedsim.report.realistic import realistic_section
from fedsim.report.rounds import bench_rounds_plot
from fedsim.report.sections import bench_header, how_to_read, leaderboard_section, run_header
from fedsim.report.stale_gi import stale_gi_section
from fedsim.report.tables import LeaderRow, leaderboard, write_leaderboard_csv
from fedsim.report.text import TEXT_FILE, bench_row_text, load_text, text_section

GALLERY_COLUMNS = 10
RUN_GALLERIES = 12  # outcomes shown for a single run (all of them are in reconstructions.npz)


def _uri(path: Path, made: bool) -> str | None:
    return data_uri(path.read_bytes()) if made and path.is_file() else None


def _frontier_section(rows: Sequence[LeaderRow], assets: Path) -> str:
    made = frontier_plot(rows, assets / "frontier.png")
    caption = ("Each point is one leaderboard row (mean over repeats; bars = std): marker = attack, colour = "
               "defense setting, \u03b5 beside DP settings. Up is more leakage, right is more utility; the dashed "
               "line links the defense settings that no other beats on both accuracy and worst-case PSNR (max "
               "over attacks); the dotted red line marks ~20 dB. Attacks without a PSNR (model inversion) are in the "
               "leaderboard only.")
    chosen = frontier_key(rows)
    if chosen is not None and chosen[0] != "psnr_mean":  # text attacks: ROUGE-L (or bag recall) instead of PSNR
        caption = caption.replace("worst-case PSNR", f"worst-case {chosen[0]}").replace(
            "; the dotted red line marks ~20 dB", "").replace("without a PSNR", "without it")
    empty = ("No row has both a leakage metric (reconstruction PSNR, or text ROUGE-L / bag recall) and a test "
             "accuracy, so there is no frontier to draw.")
    return (f'<section id="frontier"><h2>Privacy\u2013utility frontier</h2>'
            f"{figure(_uri(assets / 'frontier.png', made), caption if made else empty, 'privacy-utility frontier')}"
            "</section>")


def _copy_or(existing: Path, assets: Path, draw: Callable[[Path], bool]) -> bool:
    """The run directory's own figure when it has one (drawn from the same data), else draw it now."""
    if existing.is_file():
        shutil.copyfile(existing, assets / existing.name)
        return True
    return draw(assets / existing.name)


def _rounds_section(source: Source, rows: Sequence[LeaderRow], assets: Path) -> str:
    if source.kind == "bench":
        made = bench_rounds_plot(rows, assets / "rounds.png")
        caption = ("Left: each attack's leakage per attacked round (first ok repeat of each leaderboard row): mean "
                   "PSNR, or for text attacks mean ROUGE-L (bag recall for bag-only attacks). "
                   "Right: test accuracy of the global model per round, one line per defense setting.")
        body = figure(_uri(assets / "rounds.png", made), caption if made else "No cell has a run directory to read "
                      "rounds from.", "leakage and accuracy over rounds")
    else:
        metrics = load_metrics(source.path)
        history = metrics.get("utility") or []
        leak = _copy_or(source.path / "leakage_rounds.png", assets,
                        lambda p: leakage_plot(metrics.get("leakage") or [], history, p))
        util = _copy_or(source.path / "utility.png", assets, lambda p: utility_curve(history, p))
        shown = plotted_key(metrics.get("leakage") or [], min_points=2)
        leak_fig = figure(_uri(assets / "leakage_rounds.png", leak),
                          f"Mean {shown[1] if shown else 'leakage'} of each attack per attacked round (grey dashed: "
                          "test accuracy)." if leak else
                          "Leakage over rounds needs attacks in at least two rounds (set the attack's rounds or "
                          "every: k); this run attacked one round, see the leaderboard.", "leakage over rounds")
        what = ("Test accuracy (and loss, red dashed) of the global model per round." if any(
            "test_accuracy" in h for h in history) else "Test loss of the global model per round (the task has no "
            "accuracy: a regression's mean squared error).")
        util_fig = figure(_uri(assets / "utility.png", util), what if util else "No round was evaluated.",
                          "accuracy over rounds")
        body = f'<div class="pair">{leak_fig}{util_fig}</div>'
        diverged = divergence_note(history)
        if diverged is not None:
            body = f'<p class="bad">Warning: {esc(diverged)}.</p>' + body
    return f'<section id="rounds"><h2>Leakage and accuracy over rounds</h2>{body}</section>'


def _gallery(entry: GalleryEntry, title: str, assets: Path, index: int) -> str:
    pairs = entry.pairs(GALLERY_COLUMNS)
    strip_png(entry, assets / f"gallery_{index:02d}.png", GALLERY_COLUMNS)
    oracle = ' <span class="tag oracle">oracle</span>' if entry.oracle else ""
    psnr = entry.metrics.get("psnr_mean")
    detail = f"round {entry.round}" + (f", client {entry.client}" if entry.client >= 0 else "")
    detail += f", mean PSNR {num(psnr)} dB" if isinstance(psnr, int | float) else ""
    exact = exact_count(entry.metrics)  # over the fraction's denominator; None before issue 14
    detail += f", {exact} {EXACT_LABEL}" if exact else ""
    if entry.truth is None:  # model inversion: the released model, scored by an independent classifier
        mi, classes = entry.metrics.get("mi_accuracy"), entry.metrics.get("classes")
        detail += f", MI accuracy {num(mi)}" if isinstance(mi, int | float) else ""
        detail += f", target classes {classes}" if classes and entry.labels is None else ""
    head = f"<h3>{esc(title)}{oracle} <small>{esc(detail)}</small></h3>"
    if entry.failed and entry.reconstruction is None:
        shown = entry.failed if was_not_attacked(entry.failed) else f"attack failed: {entry.failed}"
        return f'<div class="gallery">{head}<p class="bad">{esc(shown)}</p></div>'

    def img(image, caption: str) -> str:  # noqa: ANN001
        if image is None:
            return '<div><div class="miss">none</div></div>'
        return f'<div><img src="{data_uri(png_bytes(image))}" alt=""><div class="cap">{esc(caption)}</div></div>'

    cells = []
    if entry.truth is not None:
        cells.append('<div class="rowlab">real</div>' + "".join(img(t, "") for t, _, _, _ in pairs))
        cells.append('<div class="rowlab">attack</div>' + "".join(
            img(r, f"{p:.1f} dB" if p is not None else "") for _, r, p, _ in pairs))
    else:
        cells.append('<div class="rowlab">inverted</div>' + "".join(
            img(r, f"class {c}" if c is not None else "") for _, r, _, c in pairs))
    more = ""
    shown = entry.truth if entry.truth is not None else entry.reconstruction
    total = 0 if shown is None else len(shown)
    if total > len(pairs):
        more = f'<p class="note">first {len(pairs)} of {total} images shown.</p>'
    if entry.time_limited:  # stopped by budget.time_limit_s: scored, but its numbers depend on wall time
        more += f'<p class="bad">{esc(entry.time_limited)}</p>'
    if entry.nothing_isolated:  # ran, isolated nothing: a measured 0 (fedsim.threat.Reconstruction), not a failure
        more += f'<p class="note">nothing recovered (the attack ran; not a failure): {esc(entry.nothing_isolated)}</p>'
    grid = f'<div class="grid" style="--cols:{max(len(pairs), 1)}">{"".join(cells)}</div>'
    return f'<div class="gallery">{head}{grid}{more}</div>'


def _best_entry(entries: list[GalleryEntry]) -> GalleryEntry | None:
    good = [e for e in entries if not e.failed and e.reconstruction is not None]
    if not good:
        return entries[0] if entries else None
    return max(good, key=lambda e: e.metrics.get("psnr_mean", float("-inf")))


def _outcome_failures(cells: Sequence[Any]) -> list[str]:
    """Each distinct attack failure (metrics.json ``attacks[].failed``) of a row's ok cells: an outcome without
    images (refused model, nothing recovered) is not in reconstructions.npz, so its reason comes from here."""
    out: list[str] = []
    for cell in cells:
        try:
            outcomes = load_metrics(cell.run_dir).get("attacks") or []
        except ReportSourceError:
            continue
        for outcome in outcomes:
            failed = outcome.get("failed")
            if isinstance(failed, str) and failed not in out:
                out.append(failed)
    return out


def _galleries_section(source: Source, rows: Sequence[LeaderRow], assets: Path) -> str:
    parts: list[str] = []
    if source.kind == "run":
        entries = load_reconstructions(source.path / "reconstructions.npz")
        for i, e in enumerate(entries[:RUN_GALLERIES]):
            parts.append(_gallery(e, e.attack, assets, i))
        if len(entries) > RUN_GALLERIES:
            parts.append(f'<p class="note">{len(entries) - RUN_GALLERIES} more outcomes in reconstructions.npz.</p>')
    else:
        for i, row in enumerate(rows):
            ok = sorted((c for c in row.cells if c.ok and c.run_dir is not None),
                        key=lambda c: -(c.summary.get("psnr_mean") or float("-inf")))
            entry, cell = None, None
            for cell in ok:  # best repeat (highest PSNR) that kept its images
                entry = _best_entry(load_reconstructions(cell.run_dir / "reconstructions.npz"))
                if entry is not None:
                    break
            # chosen with the ground truth (highest PSNR), so the title says so: a best case, not a typical one
            title = f"{row.attack} \u00b7 {setting_label(row)}" + (
                f" \u00b7 repeat {cell.repeat}: the highest PSNR of {len(ok)} repeat(s) and their outcomes, a best case"
                if entry else "")
            text = bench_row_text(f"{row.attack} \u00b7 {setting_label(row)}", [c.run_dir for c in ok])
            if entry is None and text is not None:  # a text attack's row: its sentences (fedsim.report.text)
                parts.append(text)
                continue
            if entry is None:
                why = _outcome_failures(ok)  # e.g. a client that refused the malicious server's model
                note = ("no images: " + "; ".join(why) if why else
                        "no images saved for this row (failed cells, or run directories without reconstructions.npz)")
                parts.append(f'<div class="gallery"><h3>{esc(title)}</h3><p class="note">{esc(note)}.</p></div>')
            else:
                parts.append(_gallery(entry, title, assets, i))
    intro = ("Top: the client's real images; below: the attack's reconstruction matched to each (the matching "
             "used for scoring), with its PSNR. Model-inversion rows show the inverted image per target class.")
    body = "".join(parts) or '<p class="note">No reconstruction images were saved (no attack ran, or '\
        'output.save_images is false).</p>'
    return f'<section id="galleries"><h2>Reconstructions</h2><p class="note">{esc(intro)}</p>{body}</section>'


def _check_targets(out_html: Path, assets: Path) -> None:
    """Refuse (before any drawing) to replace an HTML file or an assets folder that fedsim did not write."""
    if out_html.exists() or out_html.is_symlink():
        if not out_html.is_file() or out_html.is_symlink() or not is_fedsim_report(out_html):
            raise ReportSourceError(f"{out_html} exists and is not a report fedsim wrote; fedsim does not overwrite "
                                    "what it did not create: choose another --out")
    try:
        check_replaceable(assets, REPORT_ASSETS, "--out", True, "report folder")
    except FedsimError as err:
        raise ReportSourceError(str(err)) from None


def _default_sections(source: Source, header: str, partial: Path, assets: Path) -> list[str]:
    """The sections of a neural-network run or a bench (leaderboard.csv written into ``partial``)."""
    rows = leaderboard(source.cells)
    write_leaderboard_csv(rows, partial / "leaderboard.csv")
    participation = participation_section(load_metrics(source.path)) if source.kind == "run" else ""
    text = load_text(source.path / TEXT_FILE) if source.kind == "run" else None  # a text run: sentences, no images
    if source.kind == "run":  # a server that inverted stale updates: accuracy beside cost and leakage
        participation += stale_gi_section(load_metrics(source.path).get("utility") or [])
        metrics = load_metrics(source.path)  # a malicious server's rounds, and the clients' checks that flagged them
        participation += manipulation_section(metrics.get("utility") or [], metrics.get("client_metrics"))
        participation += client_checks_section(metrics)
        participation += audit_section(metrics, partial)  # "Is epsilon real?": the one-run audit, when audited
    return [header, participation, how_to_read(rows), leaderboard_section(rows, f"{assets.name}/leaderboard.csv"),
            _frontier_section(rows, partial), dp_frontier_section(source, partial, assets.name),
            realistic_section(source, partial),
            _rounds_section(source, rows, partial),
            text_section(text) if text is not None else _galleries_section(source, rows, partial)]


def render_report(source_dir: Path, out_html: Path | None = None, *, name: str | None = None) -> Path:
    """Write ``report.html`` (default ``<source_dir>/report.html``) and its assets folder beside it
    (``<out_html without .html>/``: PNGs, leaderboard.csv); return the HTML path. ``name`` replaces the
    directory name shown in the page (a run directory is rendered while still called ``*.partial``)."""
    source = load_source(Path(source_dir))
    out_html = Path(out_html) if out_html is not None else source.path / "report.html"
    assets = out_html.with_suffix("")
    if assets == out_html:
        raise ReportSourceError(f"{out_html}: the report file name must end in .html")
    _check_targets(out_html, assets)
    partial = fresh_partial(assets, REPORT_ASSETS)
    try:
        title, header = run_header(source) if source.kind == "run" else bench_header(source)
        zo = load_metrics(source.path).get("zeroth_order") if source.kind == "run" else None
        if zo:  # the one dispatch point of a zeroth-order run: its own sections and leaderboard (fedsim.zo)
            from fedsim.zo.report_html import zo_report_sections

            sections = [header, *zo_report_sections(read_yaml(source.path / "scenario.yaml") or {},
                                                    load_metrics(source.path), partial,
                                                    f"{assets.name}/leaderboard.csv")]
        else:
            sections = _default_sections(source, header, partial, assets)
        kind = "single run" if source.kind == "run" else "benchmark"
        shown = name or source.path.name
        doc = page(f"fedsim report: {title}", f"{kind} \u00b7 {shown}", sections,
                   f"generated by fedsim report on {datetime.now():%Y-%m-%d %H:%M} from {shown}")
        fd, tmp = tempfile.mkstemp(prefix=f".{out_html.name}.", suffix=".tmp", dir=out_html.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(doc)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except Exception:
        remove_owned(partial, REPORT_ASSETS)
        raise
    remove_owned(assets, REPORT_ASSETS, "report folder")  # checked above: absent, empty or fedsim's
    partial.rename(assets)
    os.replace(tmp, out_html)
    return out_html
