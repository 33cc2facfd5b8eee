"""A malicious server's manipulated rounds in a run: who got the manipulated model and what it cost in accuracy.

Reads the history-row keys :mod:`fedsim.simulation.malicious` writes in an attacked round (metrics.json
``utility``): ``manipulated_clients`` (how many clients received the manipulated model), ``honest_test_accuracy``
(the honest global model of that round, before training), ``sent_test_accuracy`` (the model actually sent, with its
architecture changes), ``sent_accuracy_drop`` (honest - sent) and ``sent_test_examples`` (their denominator; a note
under the table when it is small). The same facts go to summary.md (:func:`manipulation_markdown`)
and report.html (:func:`manipulation_section`). This is the cost of the round's
model; the cost over the whole run is a comparison with the same scenario under an honest server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.report.client_checks import ClientMetrics, flag_cell, round_flags
from fedsim.report.page import esc, table

INTRO = ("The malicious server sent a manipulated model in these rounds; its test accuracy is beside the honest "
         "global model's (the run's own cost over all rounds is a comparison with an honest-server run).")


def manipulated_rounds(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of rounds with a manipulation."""
    return [h for h in history if "manipulated_clients" in h]


def _cells(h: Mapping[str, Any]) -> list[str]:
    def fmt(key: str) -> str:
        return f"{float(h[key]):.3f}" if key in h else "n/a"

    return [f"{float(h['round']):.0f}", f"{float(h['manipulated_clients']):.0f}", fmt("honest_test_accuracy"),
            fmt("sent_test_accuracy"), fmt("sent_accuracy_drop")]


HEAD = ("round", "clients sent it", "honest model accuracy", "sent model accuracy", "accuracy drop")
FLAGGED = "flagged by client checks"  # the column added when clients ran a check (fedsim.report.client_checks)


def _table(history: Sequence[Mapping[str, Any]], client_metrics: ClientMetrics | None
           ) -> tuple[tuple[str, ...], list[list[str]]]:
    """Header and rows; with a client-side check, each round's flagged clients and layer ('2 of 4 (model_check,
    layer 6)'), so a weights-only manipulation the check flags is visible beside its cost."""
    rows = manipulated_rounds(history)
    if not round_flags(client_metrics):
        return HEAD, [_cells(h) for h in rows]
    return (*HEAD, FLAGGED), [[*_cells(h), flag_cell(client_metrics, int(h["round"]))] for h in rows]


#: Fewer test images than this make an accuracy step of 2 % or more: the tables then say how many there were.
FEW_TEST_IMAGES = 50


def small_test_note(history: Sequence[Mapping[str, Any]]) -> str:
    """A note when the manipulated rounds' accuracies were computed on fewer than :data:`FEW_TEST_IMAGES` test
    images (``sent_test_examples``, e.g. 4 held-out cifar10-mini images: steps of 0.25), else ''."""
    n = min((float(h["sent_test_examples"]) for h in manipulated_rounds(history) if "sent_test_examples" in h),
            default=None)
    if n is None or n >= FEW_TEST_IMAGES:
        return ""
    return (f"These accuracies are on n = {n:.0f} test images only (each image moves them by {1 / n:.2f}); "
            "a larger test split measures the cost.")


def manipulation_markdown(history: Sequence[Mapping[str, Any]],
                          client_metrics: ClientMetrics | None = None) -> list[str]:
    """The summary.md lines (none when no round was manipulated); ``client_metrics``: metrics.json's."""
    if not manipulated_rounds(history):
        return []
    head, rows = _table(history, client_metrics)
    lines = ["## Malicious server", "", INTRO, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    note = small_test_note(history)
    return [*lines, *(["", note] if note else []), ""]


def manipulation_section(history: Sequence[Mapping[str, Any]], client_metrics: ClientMetrics | None = None) -> str:
    """The report.html section (empty when no round was manipulated)."""
    if not manipulated_rounds(history):
        return ""
    head, rows = _table(history, client_metrics)
    body = f'<p class="note">{esc(INTRO)}</p>' + table([(t, False) for t in head],
                                                        [([esc(c) for c in cells], "") for cells in rows])
    note = small_test_note(history)
    body += f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="malicious-server"><h2>Malicious server</h2>{body}</section>'
