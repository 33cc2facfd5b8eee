"""The headline leakage metrics per input kind: the ONE registry that the bench store (cells.jsonl ``summary``),
the report loader, the leakage-over-rounds curve, the leaderboard and the console lines read, so a metric the
scorer produces for some input kind never vanishes from those outputs. Torch-free (bench and report readers).

Directions: every leakage key here is "higher leaks more" except ``lpips_mean`` and ``knn_distance`` (lower);
the baselines (``*baseline*``) are trivial attackers printed beside the attack's numbers, not leakage of the
attack (direction 0). The per-key directions of the scorer itself are ``fedsim.metrics.METRIC_DIRECTIONS``
(``fedsim.metrics.text.TEXT_METRIC_DIRECTIONS`` for text); tests check this registry against them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsim.recovery import FRAC_EXACT_KEY

IMAGE_KEYS = ("psnr_mean", "psnr_best", FRAC_EXACT_KEY, "ssim_mean", "lpips_mean", "label_acc")
"""Image reconstructions (FRAC_EXACT_KEY: absent from metrics.json written before issue 14, then left out)."""
MODEL_INVERSION_KEYS = ("mi_accuracy", "knn_distance")
TEXT_KEYS = ("exact_seq_rate", "rouge1_mean", "rouge2_mean", "rougeL_mean", "token_precision", "token_recall",
             "token_set_precision", "token_set_recall")
"""Text reconstructions (:mod:`fedsim.metrics.text`): all "higher leaks more"."""
TEXT_BASELINE_KEYS = ("bag_baseline_rougeL_mean", "public_bag_baseline_token_set_precision",
                      "public_bag_baseline_token_set_recall")
"""Trivial text attackers beside the attack (:func:`fedsim.metrics.text.score_text`): reference, not leakage."""
LEAKAGE_KEYS = (*IMAGE_KEYS, *MODEL_INVERSION_KEYS, *TEXT_KEYS, *TEXT_BASELINE_KEYS)
"""Every key a cell summary / leakage-curve row carries (a mean over the attacked clients) when present."""
LOWER_LEAKS_MORE = frozenset({"lpips_mean", "knn_distance"})

TEXT_RANK_KEYS = ("exact_seq_rate", "rougeL_mean", "token_set_recall")
"""How the leaderboard ranks text rows, most leaking first: exact sequences, then ROUGE-L (order recovered), then
bag recall (a bag-only attack has neither of the first two)."""
IMAGE_RANK_KEYS = ("psnr_mean", "mi_accuracy")


def direction(key: str) -> int:
    """+1 when a higher value of ``key`` leaks more, -1 when lower does, 0 for baselines and unknown keys."""
    if "baseline" in key or key not in LEAKAGE_KEYS:
        return 0
    return -1 if key in LOWER_LEAKS_MORE else +1


def is_text_summary(summary: Mapping[str, Any]) -> bool:
    """Whether a summary / metrics mapping carries text leakage (any :data:`TEXT_KEYS` value)."""
    return any(isinstance(summary.get(k), int | float) for k in TEXT_KEYS)


def text_summary_line(summary: Mapping[str, Any]) -> str:
    """``exact 50%, ROUGE-1/2/L 0.90/0.80/0.85, bag P/R 1.00/1.00 (public-bag baseline 0.33/0.33)`` for the
    console: the text keys present in ``summary`` (a cell summary or one outcome's metrics)."""

    def num(key: str) -> str:
        value = summary.get(key)
        return f"{value:.2f}" if isinstance(value, int | float) else "-"

    parts = []
    if isinstance(summary.get("exact_seq_rate"), int | float):
        parts.append(f"exact {summary['exact_seq_rate']:.0%}")
    if isinstance(summary.get("rougeL_mean"), int | float):
        parts.append(f"ROUGE-1/2/L {num('rouge1_mean')}/{num('rouge2_mean')}/{num('rougeL_mean')}")
    if isinstance(summary.get("token_set_precision"), int | float):
        bag = f"bag P/R {num('token_set_precision')}/{num('token_set_recall')}"
        if isinstance(summary.get("public_bag_baseline_token_set_precision"), int | float):
            bag += (f" (public-bag baseline {num('public_bag_baseline_token_set_precision')}/"
                    f"{num('public_bag_baseline_token_set_recall')})")
        parts.append(bag)
    return ", ".join(parts)
