"""The leaderboard: per attack x defense (x sweep parameters), mean and std over repeats, most leaking first.

Means and (sample, n-1) standard deviations are taken over the group's ``ok`` cells that report the
metric; failed cells are counted in ``failed`` and never silently dropped. Leakage metrics are those of
the shared bench format (PSNR/SSIM/LPIPS after one-to-one matching, the share of the batch recovered above
40 dB (``fedsim.recovery``; absent in cells written before it existed), label accuracy, and for model
inversion ``mi_accuracy`` / ``knn_distance``; for text the keys of ``fedsim.headline.TEXT_KEYS`` with the
update-free public-bag baseline), beside the final test accuracy and privacy budget epsilon
(``fedsim.privacy.summary.epsilon_fields``: Opacus's figure, the median and min over DP-SGD clients, and
Google's dp_accounting RDP and PLD figures; the epsilon against the curious server by
``fedsim.privacy.summary.epsilon_vs_server``, shared with the DP frontier: inf for central DP and DIFF2's central
noise, the headline for DP-SGD-style sample-level DP, DIFF2's larger one under local noise).
An infinite epsilon is shown as inf, never as absent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from fedsim.headline import IMAGE_RANK_KEYS, TEXT_RANK_KEYS
from fedsim.privacy.summary import epsilon_vs_server
from fedsim.recovery import EXACT_LABEL, FRAC_EXACT_KEY
from fedsim.report.loading import Cell

# (key, column title, direction of "more leakage" / better utility: +1 higher, -1 lower, 0 neither)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("psnr_mean", "PSNR (dB)", +1),
    (FRAC_EXACT_KEY, f"share {EXACT_LABEL}", +1),  # of the batch recovered exactly (fedsim.recovery)
    ("ssim_mean", "SSIM", +1),
    ("lpips_mean", "LPIPS", -1),
    ("label_acc", "label acc.", +1),
    ("mi_accuracy", "MI acc.", +1),
    ("knn_distance", "kNN dist.", -1),
    # text (fedsim.metrics.text; one registry: fedsim.headline.TEXT_KEYS), then the trivial public-bag attacker
    ("exact_seq_rate", "exact seq.", +1),
    ("rouge1_mean", "ROUGE-1", +1),
    ("rouge2_mean", "ROUGE-2", +1),
    ("rougeL_mean", "ROUGE-L", +1),
    ("token_precision", "token P", +1),
    ("token_recall", "token R", +1),
    ("token_set_precision", "bag P", +1),
    ("token_set_recall", "bag R", +1),
    ("public_bag_baseline_token_set_precision", "public-bag baseline P", 0),  # never saw the update
    ("public_bag_baseline_token_set_recall", "public-bag baseline R", 0),
    ("test_accuracy", "test acc.", 0),
    ("test_loss", "test loss", 0),  # the utility of a regression task (no accuracy)
    ("test_perplexity", "test ppl.", 0),  # language modeling: exp of the mean next-token cross-entropy
    ("epsilon", "\u03b5", 0),
    ("epsilon_vs_server", "\u03b5 vs server", 0),  # fedsim.privacy.summary.epsilon_vs_server (central DP: inf)
    ("epsilon_median", "\u03b5 median", 0),
    ("epsilon_min", "\u03b5 min", 0),
    ("epsilon_dp_accounting_rdp", "\u03b5 dp-acc. RDP", 0),
    ("epsilon_dp_accounting_pld", "\u03b5 dp-acc. PLD", 0),
)
CSV_HEAD = ["attack", "defense", "params", "cells", "ok", "failed", "attacks_failed"]


@dataclass
class Stat:
    """Mean and sample standard deviation of one metric over ``n`` repeats (``std`` None when n < 2)."""

    mean: float
    std: float | None
    n: int


@dataclass
class LeaderRow:
    """One attack x defense x params group of cells."""

    attack: str
    defense: str
    params: dict[str, Any]
    cells: list[Cell]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(1 for c in self.cells if c.ok)

    @property
    def failed(self) -> int:
        return len(self.cells) - self.ok

    @property
    def time_limited(self) -> int:
        """Scored attack outcomes of the ok cells that ``budget.time_limit_s`` stopped (their numbers depend on
        wall time: every output marks the row)."""
        return sum(int(c.summary.get("attacks_time_limited") or 0) for c in self.cells if c.ok)

    @property
    def attacks_failed(self) -> int:
        return sum(int(c.summary.get("attacks_failed") or 0) for c in self.cells if c.ok)

    @property
    def not_attacked(self) -> int:
        """Targeted updates that did not exist (client not sampled): shown, but not as attack failures."""
        return sum(int(c.summary.get("attacks_not_attacked") or 0) for c in self.cells if c.ok)

    @property
    def diverged(self) -> list[Cell]:
        """The ok cells whose training diverged (summary ``training_diverged``): their means describe a broken
        model, so every output marks the row and names the reason."""
        return [c for c in self.cells if c.ok and c.summary.get("training_diverged")]

    @property
    def diverged_reasons(self) -> str:
        return "; ".join(sorted({str(c.summary["training_diverged"]) for c in self.diverged}))

    @property
    def errors(self) -> list[str]:
        return sorted({c.error or "failed" for c in self.cells if not c.ok})

    def value(self, key: str) -> float | None:
        stat = self.stats.get(key)
        return stat.mean if stat else None


def params_label(params: dict[str, Any]) -> str:
    """``a.b=1, c=x`` in key order, or an empty string."""
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(params.items()))


def _stat(values: list[float]) -> Stat | None:
    """Mean and std of the non-NaN values; an infinite value (epsilon with sigma = 0, or DIFF2's central noise
    against the server) makes the mean that infinity (std None): DP ran and guarantees nothing, never "absent"."""
    values = [v for v in values if not math.isnan(v)]
    infinite = [v for v in values if math.isinf(v)]
    if infinite:
        return Stat(max(infinite) if any(v > 0 for v in infinite) else min(infinite), None, len(values))
    finite = values
    if not finite:
        return None
    return Stat(mean(finite), stdev(finite) if len(finite) >= 2 else None, len(finite))


RANKED_BY = "PSNR, then MI accuracy; text rows by exact sequences, then ROUGE-L, then bag recall"


def _leak_key(row: LeaderRow) -> tuple[float, ...]:
    """Most leaking first: image/model-inversion rows by PSNR, then model-inversion accuracy; text rows by
    :data:`fedsim.headline.TEXT_RANK_KEYS` (exact sequences, ROUGE-L, bag recall), a missing one ranking below any
    value; image rows before text rows (their scales differ), rows without leakage metrics last."""
    image = [row.value(k) for k in IMAGE_RANK_KEYS]
    text = [row.value(k) for k in TEXT_RANK_KEYS]
    group = 0.0 if any(v is not None for v in image) else 1.0 if any(v is not None for v in text) else 2.0
    values = image if group == 0.0 else text
    return group, *(-(v if v is not None else -math.inf) for v in values + [None] * (3 - len(values)))


def _metric(cell: Cell, key: str) -> float | None:
    """The cell's value of one metric; epsilon against the server is derived by
    :func:`fedsim.privacy.summary.epsilon_vs_server` (the frontier's derivation), not read raw."""
    value = epsilon_vs_server(cell.summary) if key == "epsilon_vs_server" else cell.summary.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def leaderboard(cells: Sequence[Cell]) -> list[LeaderRow]:
    """Group cells by (attack, defense, params), average each metric over the ok repeats, most leaking first."""
    groups: dict[tuple[str, str, str], LeaderRow] = {}
    for cell in cells:
        key = (cell.attack, cell.defense, json.dumps(cell.params, sort_keys=True, default=str))
        groups.setdefault(key, LeaderRow(cell.attack, cell.defense, dict(cell.params), [])).cells.append(cell)
    for row in groups.values():
        for key, _, _ in METRICS:
            values = [v for v in (_metric(c, key) for c in row.cells if c.ok) if v is not None]
            stat = _stat(values)
            if stat is not None:
                row.stats[key] = stat
    return sorted(groups.values(), key=lambda r: (*_leak_key(r), r.attack, r.defense, params_label(r.params)))


def present_metrics(rows: Sequence[LeaderRow]) -> list[tuple[str, str, int]]:
    """The METRICS that at least one row reports (so an all-PSNR bench has no empty MI columns)."""
    return [m for m in METRICS if any(m[0] in r.stats for r in rows)]


def write_leaderboard_csv(rows: Sequence[LeaderRow], path: Path) -> Path:
    """``leaderboard.csv``: group columns, counts, then ``<metric>_mean`` and ``<metric>_std`` for every metric,
    then ``diverged`` (ok cells whose training diverged), ``diverged_reason`` and ``attacks_not_attacked``
    (targets without an update, e.g. not sampled), ``attacks_time_limited`` (scored runs ``budget.time_limit_s``
    stopped)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEAD + [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std")]
                        + ["diverged", "diverged_reason", "attacks_not_attacked", "attacks_time_limited"])
        for r in rows:
            line: list[Any] = [r.attack, r.defense, json.dumps(r.params, sort_keys=True, default=str), len(r.cells),
                               r.ok, r.failed, r.attacks_failed]
            for key, _, _ in METRICS:
                stat = r.stats.get(key)
                line += ["" if stat is None else repr(stat.mean),
                         "" if stat is None or stat.std is None else repr(stat.std)]
            writer.writerow(line + [len(r.diverged), r.diverged_reasons, r.not_attacked, r.time_limited])
    return path
