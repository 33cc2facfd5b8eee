"""Text attacks in a run's outputs: recovered sentences beside the originals, in summary.md and report.html.

A text run's outcomes carry token ids (:class:`fedsim.attacking.AttackOutcome`: ``tokens`` (K, T) recovered, -1 =
unfilled; ``truth_tokens`` (B, T); ``token_set`` (M,) for a bag-only attack) and the text metrics of
:mod:`fedsim.metrics.text` (ROUGE-1/2/L F, exact-sequence rate, token precision/recall, token-set P/R, and the
bag-of-tokens baseline). :func:`text_records` turns them into plain records, decoded one string per token with
:func:`fedsim.text.tokenizer.decode_tokens`, which the run directory keeps as ``sentences.json`` (by default;
``output.save_images: false`` turns it off: the sentences are the client's private data, like the reconstruction
images) and which
:func:`text_markdown` and :func:`text_section` render. Each recovered sequence is shown beside the true sequence it
was matched to for scoring (``metrics["order"]``); a token equal to the truth at the same position is marked.
Everything from a tokenizer or an attack is escaped where it enters markup (HTML, and Markdown's specials); a
failed outcome shows its reason, never an empty row; one that ran and recovered nothing (no sequence, no token)
shows the client's sequences with "nothing recovered" and the reason its stats give (:func:`nothing_reason`).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.outcomes import time_limit_note

TEXT_FILE = "sentences.json"
SHOWN_MD = 8  # sequences per outcome in summary.md
SHOWN_HTML = 16  # ... and in report.html (all of them are in sentences.json)
UNFILLED = -1
# (metrics key, column title, digits) of the table; the names are fedsim.metrics.text's
COLUMNS = (("rouge1_mean", "ROUGE-1", 3), ("rouge2_mean", "ROUGE-2", 3), ("rougeL_mean", "ROUGE-L", 3),
           ("exact_seq_rate", "exact seq.", 3), ("token_precision", "token P", 3), ("token_recall", "token R", 3),
           ("token_set_precision", "bag P", 3), ("token_set_recall", "bag R", 3),
           ("public_bag_baseline_token_set_precision", "public-bag baseline P", 3),  # never saw the update
           ("public_bag_baseline_token_set_recall", "public-bag baseline R", 3),
           ("bag_baseline_rouge1_mean", "baseline ROUGE-1", 3),  # fedsim.metrics.text's bag_baseline_*
           ("bag_baseline_rougeL_mean", "baseline ROUGE-L", 3))  # the one stdout and docs/text.md compare with


def token_strings(tokenizer: str, ids: Sequence[int]) -> list[str]:
    """One display string per id (:func:`fedsim.text.tokenizer.decode_tokens`; ``""`` for -1). Without a tokenizer
    name, or for ids the tokenizer cannot decode (a malformed attack output), ``" #<id>"`` per token instead."""
    if tokenizer:
        from fedsim.text.tokenizer import decode_tokens

        try:
            return decode_tokens(tokenizer, list(ids))
        except (ValueError, KeyError, OSError):
            pass
    return ["" if i == UNFILLED else f" #{i}" for i in ids]


def _rows(value: Any) -> list[list[int]] | None:
    """A (K, T) integer tensor as lists of ints; None for anything else (absent or malformed)."""
    if value is None or not hasattr(value, "tolist") or getattr(value, "is_floating_point", lambda: True)():
        return None
    rows = value.tolist()
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], list)):
        return None
    return [[int(i) for i in row] for row in rows]


def _flat(value: Any) -> list[int] | None:
    if value is None or not hasattr(value, "tolist") or getattr(value, "is_floating_point", lambda: True)():
        return None
    flat = value.reshape(-1).tolist()
    return [int(i) for i in flat]


def text_records(outcomes: Sequence[Any], tokenizer: str, sentences: bool = True) -> list[dict[str, Any]]:
    """One JSON-ready record per outcome of a text run (attack, round, client, failed, seconds, oracle, the text
    metrics; with ``sentences``: ``pairs`` = [{truth, recovered, match}] in the client's batch order, each a list of
    token strings (``recovered`` None when no sequence was matched to it; ``match[t]``: the recovered token at t
    equals the true one), and ``bag`` = {recovered, hit, missed} when the attack returned a token set)."""
    out = []
    for o in outcomes:
        metrics = {key: o.metrics[key] for key, _, _ in COLUMNS if key in o.metrics}
        metrics.update({k: o.metrics[k] for k in ("num_exact_seq", "batch_size", "num_token_set") if k in o.metrics})
        record: dict[str, Any] = {"attack": o.attack, "attack_index": o.attack_index, "round": o.round,
                                  "client": o.partition_id, "failed": o.failed, "seconds": round(o.seconds, 3),
                                  "oracle": bool(o.oracle), "metrics": metrics, "pairs": [], "bag": None,
                                  "sentences": sentences}
        limited = None if o.failed else time_limit_note(getattr(o, "stats", None))
        if limited:  # stopped by budget.time_limit_s: scored, but its numbers depend on wall time
            record["time_limited"] = limited
        truth = _rows(getattr(o, "truth_tokens", None))
        if sentences and truth is not None and not o.failed:
            record["pairs"] = _pairs(truth, _rows(getattr(o, "tokens", None)), o.metrics.get("order"), tokenizer)
            found = _flat(getattr(o, "token_set", None))
            if not _rows(getattr(o, "tokens", None)) and not found:  # ran, and returned no sequence and no token
                record["nothing_recovered"] = nothing_reason(getattr(o, "stats", None) or {})
            if found is not None:
                true_set = {i for row in truth for i in row}
                ids = sorted(set(found))
                record["bag"] = {"recovered": token_strings(tokenizer, ids), "hit": [i in true_set for i in ids],
                                 "missed": token_strings(tokenizer, sorted(true_set - set(ids)))}
        out.append(record)
    return out


def nothing_reason(stats: dict[str, Any]) -> str:
    """Why an attack that ran recovered nothing, in one line: its stats' text entries (e.g. DAGER's ``partial``
    and ``rank_truncated``), or a plain statement when it gave none."""
    why = [str(v) for v in stats.values() if isinstance(v, str) and v.strip()]
    return "; ".join(why) or "the attack returned no sequence and no token (it gave no reason)"


def _pairs(truth: list[list[int]], recovered: list[list[int]] | None, order: Any,
           tokenizer: str) -> list[dict[str, Any]]:
    """Each true sequence with the recovered one matched to it (``order[i]``: its row, -1 none; without an order,
    row i when there is one)."""
    pairs = []
    for i, true_ids in enumerate(truth):
        row = order[i] if isinstance(order, list) and i < len(order) else (i if recovered and i < len(recovered)
                                                                          else -1)
        rec = recovered[row] if recovered is not None and isinstance(row, int) and 0 <= row < len(recovered) else None
        if rec is not None and len(rec) != len(true_ids):
            rec = (rec + [UNFILLED] * len(true_ids))[:len(true_ids)]
        match = [rec is not None and r == t and r != UNFILLED for r, t in zip(rec or true_ids, true_ids, strict=True)]
        pairs.append({"truth": token_strings(tokenizer, true_ids),
                      "recovered": None if rec is None else token_strings(tokenizer, rec), "match": match})
    return pairs


def save_text(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the records (:func:`text_records`) as ``sentences.json``."""
    path.write_text(json.dumps({"outcomes": list(records)}, indent=1), encoding="utf-8")


def load_text(path: Path) -> list[dict[str, Any]] | None:
    """The records of a run directory's ``sentences.json``; None when it has none (not a text run) or it is
    unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    outcomes = data.get("outcomes") if isinstance(data, dict) else None
    return outcomes if isinstance(outcomes, list) else None


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _title(r: dict[str, Any]) -> str:
    return f"{r['attack']} (attacks[{r['attack_index']}]), round {r['round']}, client {r['client']}"


# -- summary.md -------------------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~<>])")


def md_escape(text: str) -> str:
    """``text`` safe in Markdown: HTML's ``&`` escaped and every Markdown special backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("&", "&amp;"))


def md_tokens(tokens: Sequence[str], match: Sequence[bool] | None = None) -> str:
    """Tokens joined into one escaped line; runs of matched tokens in **bold** (their leading space outside)."""
    out, run = [], []

    def flush() -> None:
        if run:
            joined = "".join(run)
            lead = joined[:len(joined) - len(joined.lstrip())]
            out.append(f"{lead}**{md_escape(joined.lstrip())}**" if joined.strip() else joined)
            run.clear()

    for i, tok in enumerate(tokens):
        if match is not None and i < len(match) and match[i]:
            run.append(tok)
            continue
        flush()
        out.append(md_escape(tok) if tok else "\u25af")
    flush()
    return "".join(out).strip()


def text_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
    """summary.md's leakage section of a text run: the metrics table, then each outcome's sentences."""
    if not records:
        return ["No attack ran."]
    head = " | ".join(title for _, title, _ in COLUMNS)
    lines = ["Recovered text is matched one-to-one to the client's sequences before scoring (exact pairs first). "
             "ROUGE-1/2/L: F-measure of token n-grams / longest common subsequence (1 = the sequence recovered); "
             "exact seq.: share of the batch recovered token for token; token P/R: recovered tokens that are "
             "right / true tokens recovered; bag P/R: the SET of token ids recovered (order-free); public-bag "
             "baseline P/R: a trivial attacker that never saw the update and guesses the public corpus's most "
             "frequent tokens, as many as the batch has distinct ones (bag P/R mean something only above it); "
             "baseline ROUGE-1/L: every sequence guessed as the batch's T most frequent tokens (knows the tokens and "
             "their counts, not their order); ROUGE-L above it is recovered order.", "",
             f"| attack | round | client | {head} | time (s) |", "|---" * (len(COLUMNS) + 4) + "|"]
    for r in records:
        if r.get("failed"):
            lines.append(f"| {r['attack']} | {r['round']} | {r['client']} | attack failed: "
                         f"{md_escape(str(r['failed']))} |{' |' * (len(COLUMNS) - 1)} {r['seconds']:.1f} |")
            continue
        cells = " | ".join(_num(r["metrics"].get(key), digits) for key, _, digits in COLUMNS)
        lines.append(f"| {r['attack']} | {r['round']} | {r['client']} | {cells} | {r['seconds']:.1f} |")
    for r in records:
        lines += ["", f"### {md_escape(_title(r))}", ""]
        if r.get("failed"):
            lines.append(f"**Attack failed:** {md_escape(str(r['failed']))}")
            continue
        if r.get("time_limited"):
            lines += [f"**{md_escape(str(r['time_limited']))}**", ""]
        if not r.get("sentences", True):
            lines.append("Sentences not saved (output.save_images: false).")
            continue
        shown = _md_pairs(r)
        lines += shown + ([""] if shown and r.get("bag") else []) + _md_bag(r)
    return lines


def _md_pairs(r: dict[str, Any]) -> list[str]:
    lines = []
    pairs = r.get("pairs") or []
    nothing = r.get("nothing_recovered")
    if nothing is not None:
        lines += [f"**Nothing recovered:** {md_escape(str(nothing))}", ""]
    elif all(p["recovered"] is None for p in pairs):  # a bag-only attack (token_set): no sequence to show
        return lines
    for i, p in enumerate(pairs[:SHOWN_MD]):
        lines.append(f"- {i}. original: {md_tokens(p['truth'])}")
        if p["recovered"] is None:
            lines.append("  recovered: (nothing recovered)" if nothing is not None else
                         "  recovered: (none matched to it)")
        else:
            lines.append(f"  recovered: {md_tokens(p['recovered'], p['match'])} "
                         f"({sum(p['match'])}/{len(p['match'])} tokens in place, in bold)")
    if len(pairs) > SHOWN_MD:
        lines.append(f"- first {SHOWN_MD} of {len(pairs)} sequences shown (all in {TEXT_FILE})")
    return lines


def bag_token(token: str) -> str:
    """A token of a bag listing, its spaces visible (``" the"`` -> ``"\u2423the"``), so ``th`` and `` the`` and the
    space token itself read apart, the same in summary.md and report.html."""
    return token.replace(" ", "\u2423") or "\u25af"


def _md_bag(r: dict[str, Any]) -> list[str]:
    bag = r.get("bag")
    if not bag:
        return []
    wrong = [t for t, h in zip(bag["recovered"], bag["hit"], strict=True) if not h]

    def listed(tokens: Sequence[str]) -> str:
        return " \u00b7 ".join(md_escape(bag_token(t)) for t in tokens) or "none"

    lines = [f"Recovered bag of tokens: {len(bag['recovered'])} ({sum(bag['hit'])} used by the client, "
                 f"{len(wrong)} not); {len(bag['missed'])} of the client's tokens missed.",
             f"- recovered: {listed(bag['recovered'])}"]
    if wrong:
        lines.append(f"- not used by the client: {listed(wrong)}")
    if bag["missed"]:
        lines.append(f"- missed: {listed(bag['missed'])}")
    return lines


# -- report.html ----------------------------------------------------------------------------------------------
_STYLE = ("<style>.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap}.tokens mark{background:#c8f0c8}"
          ".tokens .unf{color:#999}.tokens .wrong{background:#f8d0d0}table.text td{vertical-align:top}</style>")


def html_tokens(tokens: Sequence[str], match: Sequence[bool] | None = None) -> str:
    """Escaped tokens; ``<mark>`` on a token equal to the truth at its position, a grey box for unfilled ones."""
    parts = []
    for i, tok in enumerate(tokens):
        if not tok:
            parts.append('<span class="unf">\u25af</span>')
        elif match is not None and i < len(match) and match[i]:
            parts.append(f"<mark>{html.escape(tok)}</mark>")
        else:
            parts.append(html.escape(tok))
    return f'<span class="tokens">{"".join(parts)}</span>'


def text_section(records: Sequence[dict[str, Any]] | None) -> str:
    """report.html's "Recovered text" section ("" when the run has no text records)."""
    if not records:
        return ""
    return (f'<section id="text">{_STYLE}<h2>Recovered text</h2><p class="note">{html.escape(_INTRO)}</p>'
            f"{text_outcomes_html(records)}</section>")


_INTRO = ("ROUGE-1/2/L: F-measure of token n-grams / longest common subsequence against the true sequence (1 = "
          "recovered); exact seq.: the share of the batch recovered token for token; token P/R: recovered tokens that "
          "are right / true tokens recovered; bag P/R: the set of token ids (order-free); public-bag baseline P/R: a "
          "trivial attacker that never saw the update, guessing the public corpus's most frequent tokens, as many as "
          "the batch has distinct ones (bag P/R mean something only above it); baseline ROUGE-1/L: every sequence "
          "guessed as the batch's T most frequent tokens (knows the tokens and their counts, not their order); ROUGE-L "
          "above it is recovered order. "
          "Each of the client's sequences beside the recovered one matched to it for scoring; a highlighted token "
          "equals the original at that position, \u25af marks a position the attack left unfilled. Bag-only attacks "
          "(token_set) recover which tokens were used, not their order: green = used by the client, red = not.")


def text_outcomes_html(records: Sequence[dict[str, Any]]) -> str:
    """One block per record: its title and metrics, then its sentences, bag, or failure (escaped)."""
    parts = []
    for r in records:
        m = r.get("metrics") or {}
        detail = ", ".join(f"{title} {_num(m[key], digits)}" for key, title, digits in COLUMNS if key in m)
        oracle = ' <span class="tag oracle">oracle</span>' if r.get("oracle") else ""
        head = f"<h3>{html.escape(_title(r))}{oracle} <small>{html.escape(detail)}</small></h3>"
        if r.get("time_limited"):
            head += f'<p class="bad">{html.escape(str(r["time_limited"]))}</p>'
        if r.get("failed"):
            parts.append(f'<div class="gallery">{head}<p class="bad">attack failed: '
                         f"{html.escape(str(r['failed']))}</p></div>")
            continue
        if not r.get("sentences", True):
            parts.append(f'<div class="gallery">{head}<p class="note">sentences not saved '
                         "(output.save_images: false).</p></div>")
            continue
        parts.append(f'<div class="gallery">{head}{_html_pairs(r)}{_html_bag(r)}</div>')
    return "".join(parts)


def bench_row_text(title: str, run_dirs: Sequence[Path]) -> str | None:
    """A bench row's text block: the first of ``run_dirs`` (its ok cells) that kept a ``sentences.json`` (None when
    none did: not a text row), under ``title`` with the repeat's run directory named (not a chosen best case)."""
    for run_dir in run_dirs:
        records = load_text(Path(run_dir) / TEXT_FILE)
        if records:
            return (f'<div class="gallery">{_STYLE}<h3>{html.escape(title)} <small>{html.escape(Path(run_dir).name)}'
                    f"</small></h3>{text_outcomes_html(records)}</div>")
    return None


def _html_pairs(r: dict[str, Any]) -> str:
    pairs = r.get("pairs") or []
    nothing = r.get("nothing_recovered")
    why = "" if nothing is None else f'<p class="bad">nothing recovered: {html.escape(str(nothing))}</p>'
    if nothing is None and (not pairs or all(p["recovered"] is None for p in pairs)):
        return ""
    none = "nothing recovered" if nothing is not None else "none matched to it"
    rows = []
    for i, p in enumerate(pairs[:SHOWN_HTML]):
        rec = (f'<span class="note">{none}</span>' if p["recovered"] is None else
               html_tokens(p["recovered"], p["match"]) + f' <small>{sum(p["match"])}/{len(p["match"])}</small>')
        rows.append(f"<tr><td>{i}</td><td>{html_tokens(p['truth'])}</td><td>{rec}</td></tr>")
    more = (f'<p class="note">first {SHOWN_HTML} of {len(pairs)} sequences shown (all in {TEXT_FILE}).</p>'
            if len(pairs) > SHOWN_HTML else "")
    return (f'{why}<table class="text"><thead><tr><th>#</th><th>original</th><th>recovered</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{more}")


def _html_bag(r: dict[str, Any]) -> str:
    bag = r.get("bag")
    if not bag:
        return ""
    chips = " ".join(f"<mark>{html.escape(bag_token(t))}</mark>" if hit else
                     f'<span class="wrong">{html.escape(bag_token(t))}</span>'
                     for t, hit in zip(bag["recovered"], bag["hit"], strict=True))
    missed = " ".join(html.escape(bag_token(t)) for t in bag["missed"])
    return (f'<p>recovered bag ({len(bag["recovered"])} tokens, {sum(bag["hit"])} used by the client): '
            f'<span class="tokens">{chips or "none"}</span></p>'
            + (f'<p class="note">missed ({len(bag["missed"])}): <span class="tokens">{missed}</span></p>'
               if bag["missed"] else ""))
