"""The report's "Does the attack survive real training?" section, for a realistic-training grid.

A bench whose cells sweep at least two of the realistic axes (:data:`AXES`: FedAvg local epochs, the batch, the model
state, client augmentation; benchmarks/grids/realistic*.yaml) gets, per axis, a table of leakage against the axis's
values (rows: attacks; every other axis held at its centre value, the grid's first) and one figure of four panels
(mean PSNR against each axis, one line per attack, the trivial baseline dashed). Du et al. ("SoK: On Gradient Leakage
in Federated Learning", USENIX Security 2025) find leakage falls with more local epochs, larger batches and trained
models; the *direction* column says, per attack, whether this grid reproduces that (PSNR change from the axis's first
to its last value in reading order beyond :data:`FLAT_DB`).

Leakage per cell: mean PSNR (dB), mean LPIPS (lower = closer), label accuracy, and the *share above trivial*: the
fraction of the client's images whose reconstruction PSNR beats the image's own flat mean colour (the best constant
image, which needs the truth: stronger than any blind attacker), read from the cell's reconstructions.npz (at most
64 true images, as stored) and metrics.json's per-image PSNR. The augmentation table adds the *best-shift PSNR*
(the reconstruction against every crop the augmentation could have made of the true image, so a shift alone costs
nothing) and the model-state table the test accuracy of the model the attack inverted
(:mod:`fedsim.report.realistic_metrics`). Repeats are averaged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.report.frontier import MARKERS  # noqa: E402
from fedsim.report.gallery import data_uri  # noqa: E402
from fedsim.report.loading import Cell, Source  # noqa: E402
from fedsim.report.page import esc, figure, table  # noqa: E402
from fedsim.report.realistic_metrics import attacked_model_accuracy, best_shift_psnr  # noqa: E402

#: sweep key -> (title, what the literature expects as the value grows; None: no stated direction)
AXES: dict[str, tuple[str, str | None]] = {
    "federation.local.epochs": ("local epochs", "falls"),
    "batch": ("local batch size", "falls"),
    "model_state": ("model state", "falls"),
    "federation.local.augmentation": ("augmentation", None),
}
FLAT_DB = 0.5  # a PSNR change within +-0.5 dB is "flat"
AUGMENTATION = "federation.local.augmentation"  # its table adds the best-shift PSNR
MODEL_STATE = "model_state"  # its table adds the attacked model's test accuracy
FIGURE_NAME = "realistic.png"


@dataclass(frozen=True)
class Leak:
    """One (attack, axis value) point: means over its cells (repeats); None where not measured."""

    psnr: float | None
    lpips: float | None
    label_acc: float | None
    above_trivial: float | None
    trivial_psnr: float | None
    accuracy: float | None
    cells: int
    failed: int
    psnr_shift: float | None = None  # best-shift PSNR (fedsim.report.realistic_metrics)
    attacked_accuracy: float | None = None  # test accuracy of the model the attack inverted


def realistic_axes(cells: Sequence[Cell]) -> list[str]:
    """The realistic axes the cells sweep (in :data:`AXES` order); a section needs two or more."""
    keys = {k for c in cells for k in c.params}
    return [k for k in AXES if k in keys and len({str(c.params.get(k)) for c in cells if k in c.params}) > 1]


def axis_values(source: Source, key: str) -> list[Any]:
    """The axis's values in the grid's order (its first is the centre), else in order of appearance."""
    axis = ((source.grid or {}).get("sweep") or {}).get(key)
    if isinstance(axis, list):
        return list(axis)
    if isinstance(axis, dict):
        if isinstance(axis.get("values"), list):
            return list(axis["values"])
        if isinstance(axis.get("bundles"), dict):
            return list(axis["bundles"])
    return list(dict.fromkeys(c.params[key] for c in source.cells if key in c.params))


def display_order(values: Sequence[Any]) -> list[Any]:
    """Values in reading order: by their number when each holds one (B1 < B8 < B32; 1 < 2 < 5), else as given."""
    numbers = [re.search(r"\d+(\.\d+)?", str(v)) for v in values]
    if all(numbers):
        return [v for _, v in sorted(zip([float(m.group()) for m in numbers], values, strict=True),
                                     key=lambda pair: pair[0])]
    return list(values)


def trivial_share(run_dir: Path | None, metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """(share of images above their own mean colour's PSNR, mean of that trivial PSNR) of one attack outcome."""
    per = metrics.get("psnr_per_image")
    if run_dir is None or not isinstance(per, list) or not (run_dir / "reconstructions.npz").is_file():
        return None, None
    with np.load(run_dir / "reconstructions.npz") as arrays:
        if "truth_0" not in arrays:
            return None, None
        truth = arrays["truth_0"].astype(np.float64) / 255.0
    n = min(len(truth), len(per))
    if n == 0:
        return None, None
    flat = truth[:n].mean(axis=(2, 3), keepdims=True)  # each image's own mean colour, per channel
    mse = ((truth[:n] - flat) ** 2).mean(axis=(1, 2, 3))
    base = np.where(mse > 0, -10.0 * np.log10(np.maximum(mse, 1e-12)), 100.0)
    got = np.asarray([float(v) if v is not None else -math.inf for v in per[:n]])
    return float((got > base).mean()), float(base.mean())


def _metrics_json(cell: Cell) -> dict[str, Any]:
    """The cell's metrics.json; {} when absent or unreadable."""
    if cell.run_dir is None or not (cell.run_dir / "metrics.json").is_file():
        return {}
    try:
        data = json.loads((cell.run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _outcome(data: dict[str, Any]) -> dict[str, Any]:
    """The (single) attack outcome's metrics of a cell's metrics.json; {} when it failed or is absent."""
    attacks = [a for a in data.get("attacks") or [] if not a.get("failed")]
    return dict(attacks[0].get("metrics") or {}) if attacks else {}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def point(cells: Sequence[Cell]) -> Leak:
    """Leakage of one (attack, setting) point over its cells."""
    ok = [c for c in cells if c.ok]
    data = [_metrics_json(c) for c in ok]
    shares = [trivial_share(c.run_dir, _outcome(d)) for c, d in zip(ok, data, strict=True)]
    return Leak(psnr=_mean([c.summary.get("psnr_mean") for c in ok]),
                lpips=_mean([c.summary.get("lpips_mean") for c in ok]),
                label_acc=_mean([c.summary.get("label_acc") for c in ok]),
                above_trivial=_mean([s for s, _ in shares]), trivial_psnr=_mean([b for _, b in shares]),
                accuracy=_mean([c.summary.get("test_accuracy") for c in ok]),
                cells=len(cells), failed=len(cells) - len(ok),
                psnr_shift=_mean([best_shift_psnr(c.run_dir) for c in ok]),
                attacked_accuracy=_mean([attacked_model_accuracy(d) for d in data]))


def axis_points(source: Source, key: str, axes: Sequence[str]) -> dict[str, dict[str, Leak]]:
    """attack -> str(value) -> Leak, for the cells that vary ``key`` with every other axis at its centre."""
    centre = {k: str(axis_values(source, k)[0]) for k in axes if k != key}
    out: dict[str, dict[str, Leak]] = {}
    attacks = list(dict.fromkeys(c.attack for c in source.cells))
    for attack in attacks:
        mine = [c for c in source.cells if c.attack == attack and key in c.params
                and all(str(c.params.get(k, v)) == v for k, v in centre.items())]
        if not mine:
            continue
        out[attack] = {str(v): point([c for c in mine if str(c.params[key]) == str(v)])
                       for v in display_order(axis_values(source, key))
                       if any(str(c.params[key]) == str(v) for c in mine)}
    return out


def direction(points: dict[str, Leak], values: Sequence[Any], field: str = "psnr") -> str:
    """'falls' / 'rises' / 'flat' from the first to the last measured value of ``field`` (mean PSNR, or
    ``psnr_shift``), or 'n/a'."""
    measured = [getattr(points[str(v)], field) for v in values
                if str(v) in points and getattr(points[str(v)], field) is not None]
    if len(measured) < 2:
        return "n/a"
    change = measured[-1] - measured[0]
    return "flat" if abs(change) <= FLAT_DB else ("falls" if change < 0 else "rises")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell_text(leak: Leak) -> str:
    """'PSNR / LPIPS / label acc / share above trivial' of one point."""
    if leak.psnr is None and leak.failed:
        return f"failed ({leak.failed}/{leak.cells})"
    return (f"{_fmt(leak.psnr, 1)} dB / {_fmt(leak.lpips)} / {_fmt(leak.label_acc)} / "
            f"{_fmt(leak.above_trivial)}")


def axis_rows(source: Source, key: str, axes: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (attack, one text per value, [extra columns,] direction(s), expected) of the axis's table.

    Extra columns: the augmentation axis's best-shift PSNR per value and its direction; the model-state axis's test
    accuracy of the attacked model per value."""
    values = display_order(axis_values(source, key))
    extra: list[str] = []
    if key == AUGMENTATION:
        extra = [f"best-shift PSNR {v}" for v in values]
    elif key == MODEL_STATE:
        extra = [f"test acc. {v}" for v in values]
    head = ["attack", *[str(v) for v in values], *extra, "direction (PSNR)",
            *(["direction (best-shift PSNR)"] if key == AUGMENTATION else []), "Du et al."]
    rows = []
    for attack, points in axis_points(source, key, axes).items():
        texts = [cell_text(points[str(v)]) if str(v) in points else "-" for v in values]
        if key == AUGMENTATION:
            texts += [f"{_fmt(points[str(v)].psnr_shift, 1)} dB" if str(v) in points else "-" for v in values]
        elif key == MODEL_STATE:
            texts += [_fmt(points[str(v)].attacked_accuracy) if str(v) in points else "-" for v in values]
        dirs = [direction(points, values)] + ([direction(points, values, "psnr_shift")] if key == AUGMENTATION else [])
        rows.append([attack, *texts, *dirs, AXES[key][1] or "(no stated direction)"])
    return head, rows


def realistic_markdown(source: Source) -> str:
    """The section's tables as Markdown (for notes and issue comments); "" when the grid is not realistic."""
    axes = realistic_axes(source.cells)
    if len(axes) < 2:
        return ""
    lines = ["Each entry: mean PSNR / mean LPIPS / label accuracy / share of images above their own mean colour "
             "(trivial baseline); every other axis at its centre value (the grid's first). Augmentation: "
             "best-shift PSNR = the reconstruction against the best of every crop (and mirror, where the dataset "
             "flips) the augmentation could have made of the true image. Model state: test acc. = the test "
             "accuracy of the global model the attack inverted.", ""]
    for key in axes:
        head, rows = axis_rows(source, key, axes)
        lines += [f"### Leakage vs {AXES[key][0]}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def realistic_plot(source: Source, axes: Sequence[str], path: Path) -> bool:
    """One panel per axis: mean PSNR per value, one line per attack; the trivial baseline dashed grey."""
    fig, panels = plt.subplots(1, len(axes), figsize=(3.6 * len(axes), 3.6), squeeze=False)
    drawn = False
    colours = plt.get_cmap("tab10")
    attacks = list(dict.fromkeys(c.attack for c in source.cells))  # one colour and marker per attack in every panel
    for ax, key in zip(panels[0], axes, strict=True):
        values = [str(v) for v in display_order(axis_values(source, key))]
        trivial: list[float] = []
        for attack, points in axis_points(source, key, axes).items():
            xs = [j for j, v in enumerate(values) if v in points and points[v].psnr is not None]
            if not xs:
                continue
            i = attacks.index(attack)
            ax.plot(xs, [points[values[j]].psnr for j in xs], marker=MARKERS[i % len(MARKERS)],
                    color=colours(i % 10), label=attack)
            trivial += [points[values[j]].trivial_psnr for j in xs if points[values[j]].trivial_psnr is not None]
            drawn = True
        if trivial:
            ax.axhline(sum(trivial) / len(trivial), color="grey", ls="--", lw=1, label="own mean colour")
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(AXES[key][0])
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel("mean PSNR, dB (higher = more leakage)")
    legend: dict[str, Any] = {}
    for ax in panels[0]:  # every attack once, whichever panels it appears in (dia has no epochs axis)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    labels = [k for k in legend if k != "own mean colour"] + [k for k in legend if k == "own mean colour"]
    handles = [legend[k] for k in labels]
    if drawn:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def realistic_section(source: Source, assets: Path) -> str:
    """The section's HTML (figure written to ``assets``), or "" for a bench that is not a realistic grid."""
    if source.kind != "bench":
        return ""
    axes = realistic_axes(source.cells)
    if len(axes) < 2:
        return ""
    made = realistic_plot(source, axes, assets / FIGURE_NAME)
    uri = data_uri((assets / FIGURE_NAME).read_bytes()) if made else None
    parts = []
    for key in axes:
        head, rows = axis_rows(source, key, axes)
        parts.append(f"<h3>Leakage vs {esc(AXES[key][0])}</h3>"
                     + table([(h, i == 0 or h.startswith("direction") or h == "Du et al.") for i, h in enumerate(head)],
                             [([esc(x) for x in r], "") for r in rows]))
    note = ("Each entry: mean PSNR / mean LPIPS / label accuracy / share of the client's images whose reconstruction "
            "beats the image's own flat mean colour (a trivial attacker that even knows the truth's colour). Every "
            "other axis is held at its centre value (the grid's first). <i>direction</i>: the mean PSNR's change "
            f"from the axis's first to its last value (flat within &plusmn;{FLAT_DB} dB); <i>Du et al.</i>: what "
            "'SoK: On Gradient Leakage in Federated Learning' (USENIX Security 2025) reports. Attacks are compared "
            "within a row (same budget and seed), not across rows. Reconstructions are scored against the client's "
            "un-augmented images; the augmentation table adds the <i>best-shift PSNR</i>: the reconstruction against "
            "the best of every crop (and mirror, where the dataset flips) the augmentation could have made of the "
            "true image, computed alike for every cell, so that a pure shift costs nothing. The model-state table "
            "adds the test accuracy of the global model the attack inverted.")
    caption = ("Mean PSNR against each axis (the others at their centre), one line per attack; dashed grey: the "
               "mean PSNR of the images' own mean colour.")
    return (f'<section id="realistic"><h2>Does the attack survive real training?</h2><p class="note">{note}</p>'
            f"{figure(uri, caption, 'leakage against local epochs, batch, model state and augmentation')}"
            f"{''.join(parts)}</section>")
