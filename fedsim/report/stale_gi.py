"""The privacy price of ``gi_conversion`` in a run's outputs: the summary.md sentence and the report.html section
(the rows' keys: :func:`fedsim.simulation.stale_leakage.round_metrics`; the slow class's accuracy:
``evaluation.class_accuracy``).

A run holds one aggregation rule, so its own section cannot show the gain over direct stale aggregation: it puts
the evaluated class's accuracy beside what the repair cost (inversions, failures, server seconds), when it switched
and what it leaked (each measure beside the best blind guess, scored the same way), round by round. The gain over
the other rules on the same seeds is measured by ``benchmarks/stale_gi_compare.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.report.page import esc, facts, num, table

CLASS_KEY = re.compile(r"^test_accuracy_class(\d+)$")


GI_EVENTS = ("gi_inversions", "gi_uninverted", "gi_switch_round")


def _gi_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows in which gi_conversion did something: an inversion, a stale update it let through, a switch."""
    return [h for h in history if any(h.get(k) is not None for k in GI_EVENTS)]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(h[key]) for h in rows if h.get(key) is not None]
    return sum(values) / len(values) if values else None


def _total(rows: Sequence[Mapping[str, Any]], key: str) -> int:
    return int(sum(float(h.get(key) or 0) for h in rows))


def switch_round(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The switch round s the server recorded (``gi_switch_round``: ``gi.switch_round`` or the drift detector's
    round, the earliest over the clients) from which lambda_t < 1; None if it never switched."""
    values = [int(h["gi_switch_round"]) for h in history if h.get("gi_switch_round") is not None]
    return min(values) if values else None


def _vs(value: float | None, trivial: float | None, unit: str, digits: int = 2) -> str:
    """'X unit vs Y unit for the best blind guess (margin +Z)' with an honest word when the margin is <= 0."""
    if value is None:
        return "-"
    if trivial is None:
        return f"{value:.{digits}f}{unit}"
    margin = value - trivial
    verdict = "above" if margin > 0 else "NOT above"
    return (f"{value:.{digits}f}{unit} vs {trivial:.{digits}f}{unit} for the best blind guess ({verdict} it: "
            f"margin {margin:+.{digits}f}{unit})")


def summary_line(history: list[dict[str, float]]) -> str | None:
    """One paragraph on what gi_conversion did over a run's rows (None when it did nothing): inversions, failures,
    the switch round, and the estimates' leakage beside the best blind guess (trivial attacker)."""
    rows = _gi_rows(history)
    if not rows:
        return None
    n, failed, skipped = _total(rows, "gi_inversions"), _total(rows, "gi_failed"), _total(rows, "gi_uninverted")
    seconds = sum(float(h.get("gi_seconds") or 0) for h in rows)
    switched = switch_round(history)
    parts = [f"The server inverted {n} stale update(s) ({seconds:.1f} s)"]
    if failed:
        parts.append(f"; {failed} of them FAILED (non-finite loss or estimate): those stale updates went in as they "
                     "came and their estimates are not scored")
    parts.append(".")
    if switched is not None:
        parts.append(f" It switched to stale aggregation (lambda_t below 1) at round {switched}; {skipped} stale "
                     "update(s) went in without an inversion.")
    if n == 0:
        parts.append(" No inversion ran, so this run aggregated every stale update directly (as `direct`) and "
                     "its server holds no estimate of client data.")
        return "".join(parts)
    if n == failed:
        parts.append(" No inversion succeeded: there is no estimate to score.")
        return "".join(parts)
    parts.append(" Leakage of its estimates of the slow clients' data, each measure beside the best of the blind "
                 "guesses that never saw the update (black, white, gray, dataset-mean colour and image, the "
                 "server's own starting point), scored the same way: nearest-image PSNR "
                 f"{_vs(_mean(rows, 'gi_psnr'), _mean(rows, 'gi_psnr_trivial'), ' dB')}; one-to-one matched SSIM "
                 f"{_vs(_mean(rows, 'gi_ssim_matched'), _mean(rows, 'gi_ssim_matched_trivial'), '', 3)}; "
                 f"label-share overlap {_vs(_mean(rows, 'gi_label_acc'), _mean(rows, 'gi_label_trivial'), '')}. "
                 "Only a positive margin is a privacy price of the repair.")
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
    """The report.html section of a run whose server used gi_conversion ("" when it did nothing): the class
    accuracy beside the inversions' cost, failures, switch round and the leakage of the estimates against the
    best blind guess, then one row per round."""
    rows = _gi_rows(history)
    if not rows:
        return ""
    acc = class_accuracy(history)
    items = []
    if acc is not None:
        items.append((f"class-{acc[0]} test accuracy", f"{num(100 * acc[1], 1)} % (mean of the last quarter of the "
                                                       f"rounds; last round {num(100 * acc[2], 1)} %)"))
    n, failed = _total(rows, "gi_inversions"), _total(rows, "gi_failed")
    items.append(("inversions", f"{n} in {num(sum(float(h.get('gi_seconds') or 0) for h in rows), 1)} s of server "
                                f"CPU; {failed} failed (non-finite loss: not scored, stale update used as it came)"))
    if n == 0:
        items.append(("no inversion ran", "every stale update was aggregated directly: this run is plain `direct`"))
    switched = switch_round(history)
    if switched is not None:
        items.append(("switched to stale aggregation", f"round {switched} (lambda_t below 1 from then on); "
                      f"{_total(rows, 'gi_uninverted')} stale update(s) went in without an inversion"))
    best = max((h["gi_psnr_best"] for h in rows if h.get("gi_psnr_best") is not None), default=None)
    items += [
        ("nearest-image PSNR", f"{_vs(_mean(rows, 'gi_psnr'), _mean(rows, 'gi_psnr_trivial'), ' dB')}; best "
                               f"estimate {num(best)} dB"),
        ("one-to-one matched SSIM", _vs(_mean(rows, "gi_ssim_matched"), _mean(rows, "gi_ssim_matched_trivial"), "",
                                        3)),
        ("label-share overlap", _vs(_mean(rows, "gi_label_acc"), _mean(rows, "gi_label_trivial"), "")),
    ]
    key = f"test_accuracy_class{acc[0]}" if acc is not None else None
    head = [("round", False), ("inversions", False), ("failed", False), ("lambda_t", False), ("seconds", False),
            ("PSNR dB", False), ("blind best dB", False), ("SSIM", False), ("blind best SSIM", False),
            ("labels", False), ("blind labels", False),
            (f"class-{acc[0]} acc %" if acc is not None else "class acc %", False)]
    body = [([esc(int(h["round"])) if "round" in h else "", esc(int(h.get("gi_inversions") or 0)),
              esc(int(h.get("gi_failed") or 0)), num(h.get("gi_lambda")), num(h.get("gi_seconds"), 1),
              num(h.get("gi_psnr")), num(h.get("gi_psnr_trivial")), num(h.get("gi_ssim_matched"), 3),
              num(h.get("gi_ssim_matched_trivial"), 3), num(h.get("gi_label_acc")), num(h.get("gi_label_trivial")),
              num(100 * h[key], 1) if key and key in h else num(None)], "")
            for h in rows]
    note = ("The server repairs each stale update by inverting it into an estimate of the slow client's data, so "
            "the server holds a reconstruction of that data. Each leakage measure is shown beside the best blind "
            "guess (black, white, gray, dataset-mean colour and image, the server's own un-optimised start), scored "
            "by the same function: only the margin over it is leakage. Nearest-image PSNR takes each estimate's "
            "best match among the client's images (on MNIST dominated by the black background); SSIM pairs the "
            "estimates one-to-one with distinct client images, as the attacks are matched. The accuracy gain over "
            "aggregating the stale update directly is measured on the same seeds by "
            "benchmarks/stale_gi_compare.py.")
    return (f'<section id="stale-gi"><h2>Stale-update repair by gradient inversion</h2><p class="note">{esc(note)}'
            f"</p>{facts(items)}{table(head, body)}</section>")
