"""HTML building blocks of the report: one inline stylesheet, escaping, number formats, figures, tables.

Everything is escaped with :func:`html.escape` at the point where text enters markup; images are data
URIs; there is no script and no external reference, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CSS = """
:root { --ink:#1d2330; --muted:#5d6675; --line:#e3e6ec; --bg:#fafbfc; --accent:#2f5d9e; --warn:#9a3412; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 19px; margin: 38px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p, li { max-width: 78ch; }
.sub { color: var(--muted); margin: 0 0 18px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 6px 22px 18px;
  margin-top: 22px; }
section > h2 { border: none; margin-top: 14px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: #f4f6f9; padding: 10px 12px; border-radius: 6px; overflow-x: auto; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #f1f3f7; font-weight: 600; position: sticky; top: 0; }
th.l, td.l { text-align: left; white-space: normal; }
tbody tr:hover { background: #f6f8fb; }
tr.top td { background: #fff4e5; }
td .sd { color: var(--muted); font-size: 12px; }
.bad { color: var(--warn); font-weight: 600; }
.note { color: var(--muted); font-size: 13px; }
.howto { background: #f2f6fc; border-left: 4px solid var(--accent); }
figure { margin: 12px 0; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 90ch; }
.pair { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.pair figure { flex: 1 1 420px; }
.gallery { margin: 14px 0 22px; }
.gallery h3 small { color: var(--muted); font-weight: normal; }
.grid { display: grid; grid-template-columns: 54px repeat(var(--cols), 74px); gap: 6px 6px; align-items: center; }
.grid .rowlab { color: var(--muted); font-size: 12px; }
.grid img { width: 72px; height: 72px; image-rendering: pixelated; border: 1px solid var(--line); border-radius: 3px; }
.grid .cap { font-size: 11px; color: var(--muted); text-align: center; width: 72px; }
.grid .miss { width: 72px; height: 72px; display: flex; align-items: center; justify-content: center;
  border: 1px dashed var(--line); color: var(--muted); font-size: 11px; }
.tag { display: inline-block; font-size: 11px; padding: 1px 7px; border-radius: 9px; background: #eef1f6;
  color: var(--muted); margin-left: 6px; }
.tag.oracle { background: #fde7c7; color: #7a4a00; }
footer { color: var(--muted); font-size: 12px; margin-top: 30px; }
"""


def esc(value: Any) -> str:
    """Escaped text of any value (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, ``inf`` / ``-inf`` for an infinite one (e.g. epsilon with sigma = 0: DP
    ran, nothing is guaranteed; never shown as absent), or an en dash when absent / NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return "\u2013"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def figure(uri: str | None, caption: str, alt: str) -> str:
    """A figure with an embedded image and an escaped caption; a short note when the figure is absent."""
    if uri is None:
        return f'<p class="note">{esc(caption)}</p>'
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'


def table(head: Sequence[tuple[str, bool]], rows: Iterable[tuple[Sequence[str], str]]) -> str:
    """A table from (title, left-aligned) columns and (cells as ready HTML, row class) rows."""
    ths = "".join(f'<th class="{"l" if left else ""}">{esc(t)}</th>' for t, left in head)
    body = []
    for cells, cls in rows:
        tds = "".join(f'<td class="{"l" if left else ""}">{c}</td>' for c, (_, left) in zip(cells, head, strict=True))
        body.append(f'<tr class="{esc(cls)}">{tds}</tr>')
    return f'<div class="tablewrap"><table><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def facts(items: Iterable[tuple[str, str]]) -> str:
    """A definition list of (label, escaped value HTML) pairs."""
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


GENERATOR = '<meta name="generator" content="fedsim report">'
"""fedsim's signature in every report it writes: an existing HTML file is replaced only when it has it."""


def is_fedsim_report(path: Path) -> bool:
    """Whether the file ``path`` is an HTML report fedsim wrote (its head holds :data:`GENERATOR`)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return False
    return GENERATOR.encode() in head


def page(title: str, subtitle: str, sections: Iterable[str], footer: str) -> str:
    """The whole document: inline CSS, no script, no external reference."""
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR}"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
        + "\n".join(sections)
        + f"<footer>{esc(footer)}</footer></main></body></html>\n"
    )
