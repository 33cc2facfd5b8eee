"""The text sections of the HTML report: what ran (header), how to read it, and the leaderboard."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fedsim.augment import describe, scoring_note
from fedsim.headline import TEXT_RANK_KEYS, is_text_summary
from fedsim.report.loading import Cell, Source, load_metrics, read_yaml
from fedsim.report.page import esc, facts, num, table
from fedsim.report.privacy import privacy_lines
from fedsim.report.tables import RANKED_BY, LeaderRow, params_label, present_metrics

_OPEN = '<section id="how-to-read" class="howto"><h2>How to read this</h2><ul>'
_IMAGE_ITEMS = """
<li><b>PSNR</b> (dB) compares each reconstruction with the real image it was matched to (one-to-one
matching before scoring; a summed gradient carries no order). Higher means more leakage. A rough guide
for 32&times;32 colour images: below ~15 dB a reconstruction is mostly noise or colour blobs (noise with
the right mean colours already scores 10&ndash;15 dB), around 15&ndash;20 dB coarse shapes may appear,
above ~20 dB the image is usually recognisable. PSNR depends on the image (smooth images score higher),
rewards blur and punishes small shifts, so look at the galleries and SSIM too.</li>
<li><b>share &gt; 40 dB</b> is the fraction of the real batch recovered above 40 dB PSNR, visually exact (an image
the attack returned nothing for is a miss). Malicious-server attacks recover some images exactly and the rest
not at all, so a high share beside a middling mean PSNR is their signature. An exact image counts as 100 dB
(PSNR is capped there, MSE 1e-10), so their mean PSNR mostly restates the share (100 dB times it, plus the misses'
~5&ndash;15 dB): compare exact attacks by share &gt; 40 dB, the headline, not by mean PSNR.</li>
<li><b>SSIM</b> (0&ndash;1, higher = more structure recovered) and <b>LPIPS</b> (a learned perceptual
distance, lower = more similar) measure the same thing differently; <b>label acc.</b> is the fraction of
the batch's labels the attack recovered.</li>
<li><b>MI acc.</b> and <b>kNN dist.</b> score model-inversion attacks, which attack the released model
rather than an update: how often an independent evaluation classifier assigns the inverted images to
their target class, and their distance in its feature space to the nearest held-out real image of that
class (lower = more like real images of the class; these are class-level, not any client's own images).</li>
"""
_TEXT_ITEMS = """
<li>Text attacks are scored on <b>token ids</b>, each recovered sequence matched one-to-one to a true one (exact
pairs first). <b>exact seq.</b> is the share of the batch recovered token for token (the headline, which ranks
text rows), <b>ROUGE-1/2/L</b> the F-measure of token n-grams / longest common subsequence (1 = recovered; a missing
sequence counts 0), <b>token P/R</b> the recovered tokens that are right / the true tokens recovered (order-free,
with repeats). Higher means more leakage for all of them.</li>
<li><b>bag P/R</b> is the same on the SET of distinct token ids, the whole output of bag-only attacks
(token_set). The <b>public-bag baseline</b> beside it is a trivial attacker that never saw the update: it guesses
the public corpus's most frequent tokens, as many as the batch has distinct ones. Bag P/R near it means the attack
learned nothing about which tokens the client typed; below it, less than a guess.</li>
"""
_COMMON_ITEMS = """
<li><b>&epsilon;</b> is the differential-privacy budget the defense reports (lower = stronger guarantee):
for central DP the client-level budget of the released model; for DP-SGD the largest per-client
(sample-level) budget over the whole run, with the median and minimum over clients beside it.
<b>&epsilon; dp-acc. RDP</b> recomputes it with Google's independent dp_accounting library (it should agree
within 1 %), <b>&epsilon; dp-acc. PLD</b> with privacy-loss distributions (tighter than RDP).
It bounds what <i>any</i> attack can learn; a leakage metric measures what <i>this</i> attack, with this budget, did.
A low leakage score under small attack budgets is not proof of privacy, and central DP with a curious server
protects the released model, not the updates that server sees.</li>
<li>&plusmn; is the sample standard deviation over repeats (blank with one repeat). Rows marked
<span class="tag oracle">oracle</span> were handed ground truth: they are upper bounds, not threats.</li>
</ul></section>
"""
HOW_TO_READ = _OPEN + _IMAGE_ITEMS + _COMMON_ITEMS  # an image / model-inversion report


def how_to_read(rows: Sequence[LeaderRow]) -> str:
    """The "How to read this" section for the metrics the rows carry: image terms (PSNR, SSIM, ...), text terms
    (exact sequences, ROUGE, bag P/R beside the public-bag baseline), or both for a mixed report."""
    text = any(is_text_summary(c.summary) for r in rows for c in r.cells)
    image = any(k in r.stats for r in rows for k in ("psnr_mean", "mi_accuracy")) or not text
    return _OPEN + (_IMAGE_ITEMS if image else "") + (_TEXT_ITEMS if text else "") + _COMMON_ITEMS


def _plugin(spec: dict[str, Any]) -> str:
    params = spec.get("params") or {}
    args = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in params.items())
    return f"<code>{esc(spec.get('name'))}</code>" + (f" ({esc(args)})" if args else "")


def _knowledge(spec: dict[str, Any]) -> str:
    know = spec.get("knowledge") or {}
    parts = [f"labels {know.get('labels', 'infer')}", f"BN stats {know.get('bn_stats', 'none')}",
             "local hyperparameters " + ("known" if know.get("local_hparams") else "unknown"),
             "defense " + ("known" if know.get("defense") else "unknown")]
    if know.get("oracle_masks"):
        parts.append("ORACLE: true dropout masks")
    budget = spec.get("budget") or {}
    targets = f"rounds {spec.get('rounds')}" if spec.get("every") is None else f"every {spec.get('every')} rounds"
    return (f"{_plugin(spec)}: {esc('; '.join(parts))}<br><span class=\"note\">{esc(targets)}, clients "
            f"{esc(spec.get('clients'))}; budget {esc(budget.get('iterations'))} iterations &times; "
            f"{esc(budget.get('restarts', 1))} restart(s)</span>")


def scenario_facts(scn: dict[str, Any]) -> list[tuple[str, str]]:
    """Data, model, federation, defenses and the attacks' declared knowledge of a resolved scenario.yaml."""
    if scn.get("zeroth_order"):  # a black-box task: task, method, message defenses instead (fedsim.zo.summary)
        from fedsim.zo.summary import zo_facts
        return zo_facts(scn)
    data, model, fed = scn.get("data") or {}, scn.get("model") or {}, scn.get("federation") or {}
    local, part = fed.get("local") or {}, data.get("partition") or {}
    partition = part.get("kind", "iid") + (f" (alpha {part.get('alpha')})" if part.get("kind") == "dirichlet" else "")
    steps = f"{local.get('steps')} steps" if local.get("steps") else f"{local.get('epochs', 1)} epoch(s)"
    items = [
        ("data", f"<code>{esc(data.get('dataset'))}</code>, {esc(partition)} partition"),
        ("model", f"<code>{esc(model.get('name'))}</code> (width {esc(model.get('width'))}, norm "
                  f"{esc(model.get('norm'))}, dropout {esc(model.get('dropout'))})"),
        ("federation", esc(f"{fed.get('clients')} clients, {fed.get('clients_per_round') or fed.get('clients')} per "
                           f"round, {fed.get('rounds')} round(s), {fed.get('protocol')}; local batch "
                           f"{local.get('batch_size')}, lr {local.get('lr')}, {steps}, {local.get('optimizer')}")),
        *([("augmentation", esc(f"{describe(aug, str(data.get('dataset')))}; {scoring_note(aug)}"))]
          if (aug := str(local.get("augmentation") or "none")) != "none" else []),
        ("backend", esc((scn.get("backend") or {}).get("kind"))),
        ("defenses", ", ".join(_plugin(d) for d in scn.get("defenses") or []) or "none"),
    ]
    attacks = scn.get("attacks") or []
    items.append(("threat model", "<br>".join(_knowledge(a) for a in attacks) or "no attack"))
    return items


def _when(path: Path) -> str:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    except OSError:
        return "?"


def run_header(source: Source) -> tuple[str, str]:
    """(title, header section) of a single run."""
    scn = read_yaml(source.path / "scenario.yaml") or {}
    metrics = load_metrics(source.path)
    t = metrics.get("timing") or {}
    items = scenario_facts(scn) + [
        ("seed", esc(metrics.get("seed"))),
        ("time", esc(f"federation {num(t.get('federation_s'), 1)} s, attacks {num(t.get('attacks_s'), 1)} s, "
                     f"total {num(t.get('total_s'), 1)} s; finished {_when(source.path / 'metrics.json')}")),
    ]
    privacy = privacy_lines(metrics.get("privacy"), scn.get("defenses"))
    if privacy:
        items.append(("privacy", "<br>".join(esc(line) for line in privacy)))
    desc = f"<p>{esc(scn.get('description', '')).strip()}</p>" if scn.get("description") else ""
    name = scn.get("name") or metrics.get("scenario") or source.path.name
    return str(name), f'<section id="header"><h2>What ran</h2>{desc}{facts(items)}</section>'


def bench_header(source: Source) -> tuple[str, str]:
    """(title, header section) of a benchmark: grid counts, the first cell's scenario, the grid itself."""
    cells = source.cells
    ok = sum(1 for c in cells if c.ok)
    seeds = sorted({c.seed for c in cells if c.seed is not None})
    items = [
        ("cells", f"{len(cells)} finished: {ok} ok, " + (f'<span class="bad">{len(cells) - ok} failed</span>'
                                                         if ok < len(cells) else "0 failed")),
        ("attacks", esc(", ".join(sorted({c.attack for c in cells})))),
        ("defenses", esc(", ".join(sorted({c.defense for c in cells})))),
        ("repeats, seeds", esc(f"{len({c.repeat for c in cells})} repeat(s); seeds "
                               + ", ".join(map(str, seeds[:6])) + (", \u2026" if len(seeds) > 6 else ""))),
        ("time", esc(f"{sum(c.seconds or 0.0 for c in cells):.1f} s of cell time; last cell finished "
                     f"{_when(source.path / 'cells.jsonl')}")),
    ]
    warnings = []
    short = [c.cell_id for c in cells if (c.summary or {}).get("clients_failed")]
    if short:
        listed = ", ".join(short[:8]) + (", ..." if len(short) > 8 else "")
        warnings.append(f"{len(short)} cell(s) aggregated fewer clients than requested in some round (their "
                        f"summary.md lists who failed and why): {listed}")
    if source.truncated_tail:
        warnings.append("the last line of cells.jsonl is cut off (a cell being written, or a killed bench): ignored")
    if source.skipped_lines:
        warnings.append(f"unreadable cells.jsonl lines (not counted anywhere else): {source.skipped_lines}")
    if warnings:
        items.append(("warnings", '<span class="bad">' + "<br>".join(esc(w) for w in warnings) + "</span>"))
    first = next((c for c in cells if c.run_dir is not None and (c.run_dir / "scenario.yaml").is_file()), None)
    scn = read_yaml(first.run_dir / "scenario.yaml") if first else None
    base = ""
    if scn:
        knowledge = {}
        for c in cells:  # each attack's declared knowledge, from a cell that ran it
            if c.attack not in knowledge and c.run_dir is not None:
                other = read_yaml(c.run_dir / "scenario.yaml") or {}
                knowledge[c.attack] = "<br>".join(_knowledge(a) for a in other.get("attacks") or [])
        rows = [(k, v) for k, v in scenario_facts(scn) if k not in ("defenses", "threat model")]
        rows.append(("threat model", "<br>".join(v for v in knowledge.values() if v) or "no attack"))
        base = (f"<h3>Base scenario</h3><p class=\"note\">from cell {esc(first.cell_id)} (<code>"
                f"{esc(scn.get('name'))}</code>); the grid varies the attack, the defense and the swept parameters.</p>"
                + facts(rows))
    grid = source.grid
    grid_html = ""
    if grid is not None:
        grid_html = ("<details><summary>grid.yaml</summary><pre>" + esc(yaml.safe_dump(grid, sort_keys=False))
                     + "</pre></details>")
    title = str((grid or {}).get("name") or source.path.name)
    return title, f'<section id="header"><h2>What ran</h2>{facts(items)}{base}{grid_html}</section>'


def _cell(row: LeaderRow, key: str, digits: int) -> str:
    stat = row.stats.get(key)
    if stat is None:
        return "\u2013"
    sd = f' <span class="sd">&plusmn; {num(stat.std, digits)}</span>' if stat.std is not None else ""
    return num(stat.mean, digits) + sd


def leaderboard_section(rows: Sequence[LeaderRow], csv_name: str) -> str:
    """The leaderboard table (most leaking first, highlighted) and every failed cell with its reason."""
    metrics = present_metrics(rows)
    with_params = any(r.params for r in rows)
    head = [("#", False), ("attack", True), ("defense", True)] + ([("params", True)] if with_params else [])
    head += [("repeats", False), ("failed", False)] + [(title, False) for _, title, _ in metrics]
    body = []
    for i, r in enumerate(rows, start=1):
        oracle = "oracle" in r.attack or any(c.summary.get("oracle") for c in r.cells)
        tag = ' <span class="tag oracle">oracle</span>' if oracle else ""
        diverged = (f' <span class="bad" title="{esc(r.diverged_reasons)}">diverged {len(r.diverged)}/{r.ok}</span>'
                    if r.diverged else "")
        limited = (' <span class="bad" title="budget.time_limit_s stopped these attack runs: the numbers depend on '
                   f'wall time">time-limited {r.time_limited}</span>' if r.time_limited else "")
        cells = [str(i), esc(r.attack.replace(" (oracle)", "")) + tag + limited, esc(r.defense) + diverged]
        cells += [esc(params_label(r.params))] if with_params else []
        failed = r.failed + r.attacks_failed
        cells += [f"{r.ok}/{len(r.cells)}", f'<span class="bad">{failed}</span>' if failed else "0"]
        cells += [_cell(r, key, 3 if key in ("ssim_mean", "lpips_mean") else 2) for key, _, _ in metrics]
        leaks = any(k in r.stats for k in ("psnr_mean", "mi_accuracy", *TEXT_RANK_KEYS))
        body.append((cells, "top" if i == 1 and leaks else ""))
    failures: list[Cell] = [c for r in rows for c in r.cells if not c.ok]
    fail_html = ""
    if failures:
        fail_rows = [([esc(c.cell_id), esc(c.attack), esc(c.defense), esc(params_label(c.params)), str(c.repeat),
                       esc(c.error or "failed")], "") for c in failures]
        fail_html = ("<h3>Failed cells</h3><p class=\"note\">counted in <i>failed</i> above; their metrics are not "
                     "in the means.</p>" + table([("cell", True), ("attack", True), ("defense", True),
                                                  ("params", True), ("repeat", False), ("error", True)], fail_rows))
    div_rows = [([esc(c.cell_id), esc(c.attack), esc(c.defense), esc(params_label(c.params)), str(c.repeat),
                  esc(str(c.summary["training_diverged"]))], "") for r in rows for c in r.diverged]
    if div_rows:
        fail_html += ("<h3>Diverged cells</h3><p class=\"note\">marked <i>diverged</i> above: their training diverged, "
                      "so the utility and attack figures in the means describe a broken model.</p>"
                      + table([("cell", True), ("attack", True), ("defense", True), ("params", True),
                               ("repeat", False), ("why", True)], div_rows))
    partial = sum(r.attacks_failed for r in rows)
    note = (f" {partial} attack run(s) inside ok cells failed (e.g. an empty DP-SGD batch); they are counted in "
            "<i>failed</i> and left out of the means." if partial else "")
    skipped = sum(r.not_attacked for r in rows)
    note += (f" {skipped} targeted update(s) were not attacked (the client was not sampled in that round, or sent "
             "none): not failures, not in the means." if skipped else "")
    why = sorted({w for r in rows for c in r.cells if c.ok for w in c.summary.get("not_attacked_reasons") or ()})
    note += f" Why: {esc('; '.join(why[:5]))}{' ...' if len(why) > 5 else ''}." if why else ""
    return (f'<section id="leaderboard"><h2>Leaderboard</h2><p class="note">One row per attack &times; defense'
            f"{' &times; parameters' if with_params else ''}, mean &plusmn; std over ok repeats; sorted by "
            f"{RANKED_BY} (most leaking first, highlighted). <i>failed</i> counts failed cells and failed "
            f"attack runs.{note} "
            f"Also in <code>{esc(csv_name)}</code>.</p>{table(head, body)}{fail_html}</section>")
