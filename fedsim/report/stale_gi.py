"""The privacy price of ``gi_conversion`` in a run's outputs: the summary.md sentence and the report.html section
(the rows' keys: :func:`fedsim.simulation.stale_leakage.round_metrics`; the slow class's accuracy:
``evaluation.class_accuracy``).

A run holds one aggregation rule, so its own section cannot show the gain over direct stale aggregation: it puts
the slow class's accuracy beside what the repair cost (inversions, server seconds) and leaked (the estimates'
nearest-image PSNR against the blind gray guess, label-share overlap), round by round. The gain over the other
rules on the same seeds is measured by ``benchmarks/stale_gi_compare.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.report.page import esc, facts, num, table

CLASS_KEY = re.compile(r"^test_accuracy_class(\d+)$")


def _gi_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [h for h in history if h.get("gi_inversions")]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(h[key]) for h in rows if key in h]
    return sum(values) / len(values) if values else None


def switch_round(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The first round after an inversion in which a stale update was aggregated without one (``clients_stale`` >
    ``gi_inversions``): where ``lambda_t`` reached 0 (``gi.switch_round`` or the drift detector); None if never."""
    inverted = False
    for row in history:
        stale, done = int(row.get("clients_stale", 0)), int(row.get("gi_inversions", 0))
        if inverted and stale > done and "round" in row:
            return int(row["round"])
        inverted = inverted or done > 0
    return None


def summary_line(history: list[dict[str, float]]) -> str | None:
    """One sentence on the privacy price of gi_conversion over a run's rows (None without inversions): how many
    inversions, their cost, and the mean leakage of the estimates beside the blind-guess baseline."""
    rows = _gi_rows(history)
    if not rows:
        return None
    n = int(sum(h["gi_inversions"] for h in rows))
    seconds = sum(h["gi_seconds"] for h in rows)
    parts = [f"The server inverted {n} stale update(s) ({seconds:.1f} s); its estimates of the slow clients' data"]
    if _mean(rows, "gi_psnr") is not None:
        parts.append(f" are {_mean(rows, 'gi_psnr'):.2f} dB from the nearest real image on average (blind gray image "
                     f"{_mean(rows, 'gi_psnr_blind'):.2f} dB; best estimate "
                     f"{max(h['gi_psnr_best'] for h in rows):.2f} dB),")
    parts.append(f" with label shares overlapping the client's by {_mean(rows, 'gi_label_acc'):.2f} (the privacy "
                 "price of the repair).")
    switched = switch_round(history)
    if switched is not None:
        parts.append(f" From round {switched} it aggregated stale updates without inverting them (lambda_t = 0).")
    return "".join(parts)


def class_accuracy(history: Sequence[Mapping[str, Any]]) -> tuple[int, float, float] | None:
    """(class, mean over the last quarter of the evaluated rounds, last value) of the first
    ``test_accuracy_class<k>`` key in the rows; None when no class accuracy was evaluated."""
    for row in history:
        for key in row:
            match = CLASS_KEY.match(key)
            if match:
                values = [float(h[key]) for h in history if key in h]
                tail = values[-max(1, len(values) // 4):]
                return int(match.group(1)), sum(tail) / len(tail), values[-1]
    return None


def stale_gi_section(history: Sequence[Mapping[str, Any]]) -> str:
    """The report.html section of a run whose server inverted stale updates ("" when it inverted none): the slow
    class's accuracy beside the inversions' cost and the leakage of the estimates, then one row per round."""
    rows = _gi_rows(history)
    if not rows:
        return ""
    acc = class_accuracy(history)
    items = []
    if acc is not None:
        items.append((f"class-{acc[0]} test accuracy", f"{num(100 * acc[1], 1)} % (mean of the last quarter of the "
                                                       f"rounds; last round {num(100 * acc[2], 1)} %)"))
    best = max((h["gi_psnr_best"] for h in rows if "gi_psnr_best" in h), default=None)
    items += [
        ("inversions", f"{int(sum(h['gi_inversions'] for h in rows))} in {num(sum(h['gi_seconds'] for h in rows), 1)}"
                       " s of server CPU"),
        ("estimates' nearest-image PSNR", f"{num(_mean(rows, 'gi_psnr'))} dB mean, best "
                                          f"{num(best)} dB "
                                          f"(blind gray image: {num(_mean(rows, 'gi_psnr_blind'))} dB)"),
        ("label-share overlap", num(_mean(rows, "gi_label_acc"))),
    ]
    switched = switch_round(history)
    if switched is not None:
        items.append(("switched back to stale aggregation", f"round {switched} (lambda_t = 0: no more inversions)"))
    key = f"test_accuracy_class{acc[0]}" if acc is not None else None
    head = [("round", False), ("inversions", False), ("lambda_t", False), ("seconds", False),
            ("PSNR dB", False), ("blind dB", False), ("labels", False), ("slow-class acc %", False)]
    body = [([esc(int(h["round"])) if "round" in h else "", esc(int(h["gi_inversions"])), num(h.get("gi_lambda")),
              num(h.get("gi_seconds"), 1), num(h.get("gi_psnr")), num(h.get("gi_psnr_blind")),
              num(h.get("gi_label_acc")), num(100 * h[key], 1) if key and key in h else num(None)], "")
            for h in rows]
    note = ("The server repairs each stale update by inverting it into an estimate of the slow client's data, so "
            "the server holds a reconstruction of that data: the privacy price of the repair. The accuracy gain "
            "over aggregating the stale update directly is measured on the same seeds by "
            "benchmarks/stale_gi_compare.py.")
    return (f'<section id="stale-gi"><h2>Stale-update repair by gradient inversion</h2><p class="note">{esc(note)}'
            f"</p>{facts(items)}{table(head, body)}</section>")
