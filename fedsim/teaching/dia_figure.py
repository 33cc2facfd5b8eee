"""Dropout is NOT a defense: sweep the dropout probability and draw one figure.

Runs ``scenarios/tutorial/05_dropout_is_not_a_defense.yaml`` (a real federation, then
inverting_gradients, dia and dia_oracle on the same client update) once per dropout probability p,
through :func:`fedsim.scenario.load_scenario` with a ``model.dropout=p`` override and
:func:`fedsim.run.run_scenario`. It writes, into ``--out``:

* ``dia_sweep.png``: ground truth on top, one row of reconstructions per method, one column per p,
  and PSNR versus p per method (Scheliga, Mäder, Seeland, AAAI 2023, Fig. 1 and Sec. 5 in small);
* ``dia_sweep.csv`` and ``dia_sweep.json``: PSNR and MSE (pixel space [0, 1]) per (p, method).

Usage::

    python -m fedsim.teaching.dia_figure [--ps 0,0.1,0.25,0.5] [--iterations 500] [--out runs/dia_sweep]
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fedsim import jsonio  # noqa: E402
from fedsim.errors import FedsimError  # noqa: E402
from fedsim.isolation import torch_threads  # noqa: E402
from fedsim.outputs import FIGURES, claim_dir  # noqa: E402
from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import Scenario, load_scenario  # noqa: E402
from fedsim.teaching.resolve import resolved_attack  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "tutorial" / "05_dropout_is_not_a_defense.yaml"
PS = (0.0, 0.1, 0.25, 0.5)
SCHEDULES = ("Each keeps its own schedule: IG decays its step at 3/8, 5/8, 7/8 of the run; DIA and the oracle "
             "decay on plateaus and stop once the loss is below 1e-5.")
LABELS = {"inverting_gradients": "Inverting Gradients", "dia": "DIA", "dia_oracle": "oracle (true masks)"}


def sweep_scenarios(
    scenario: Path | str = SCENARIO, ps: Sequence[float] = PS, iterations: int | None = None
) -> list[tuple[float, Scenario]]:
    """The validated scenario of each column: ``model.dropout = p`` and, with ``iterations``, every
    attack's budget set to it; nothing else changes (``fedsim.teaching.comparisons`` checks it)."""
    count = len(load_scenario(scenario).attacks)
    out = []
    for p in ps:
        overrides = [f"model.dropout={p}"]
        if iterations is not None:
            overrides += [f"attacks.{i}.budget.iterations={iterations}" for i in range(count)]
        out.append((float(p), load_scenario(scenario, overrides)))
    return out


def sweep(
    scenario: Path | str = SCENARIO,
    ps: Sequence[float] = PS,
    iterations: int | None = None,
    backend: str | None = "inprocess",
) -> list[dict[str, Any]]:
    """Run the scenario once per p; one row per (p, attack, round, client) with metrics and the images."""
    rows: list[dict[str, Any]] = []
    for p, spec in sweep_scenarios(scenario, ps, iterations):
        result = run_scenario(spec, write=False, backend=backend)
        for outcome in result.outcomes:
            order = outcome.metrics.get("order")
            rows.append({
                "p": p,
                "method": outcome.attack,
                "round": outcome.round,
                "client": outcome.partition_id,
                "oracle": outcome.oracle,
                "psnr": outcome.metrics.get("psnr_mean", float("nan")),
                "mse": outcome.metrics.get("mse_mean", float("nan")),
                "iterations": outcome.stats.get("iterations", float("nan")),
                "seconds": round(outcome.seconds, 2),
                "failed": outcome.failed,
                "image": _matched_first(outcome.reconstruction, order),
                "truth": outcome.truth,
            })
    return rows


def _matched_first(images: torch.Tensor | None, order: Any) -> torch.Tensor | None:
    """The reconstruction the evaluator matched to the outcome's first real image (the one drawn), as
    a batch of one; the images as they are when no matching was recorded."""
    if images is None or not isinstance(order, list | tuple) or not order or not 0 <= int(order[0]) < len(images):
        return images
    return images[int(order[0]):int(order[0]) + 1]


def _show(ax: Any, image: torch.Tensor | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "failed", ha="center", va="center", fontsize=8)
        return
    x = image[0].detach().clamp(0, 1).cpu()
    ax.imshow(x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy(), cmap="gray" if x.shape[0] == 1 else None,
              vmin=0, vmax=1)


OutcomeKey = tuple[int, int]  # (round, client): which update was attacked


@dataclass(frozen=True)
class Panel:
    """One image of the figure: grid position, the outcome it belongs to, and what it shows."""

    row: int
    col: int
    key: OutcomeKey
    method: str | None  # None: the real image
    image: torch.Tensor | None
    psnr: float | None = None


def panels(rows: Sequence[dict[str, Any]]) -> tuple[list[Panel], list[float], list[str], list[OutcomeKey]]:
    """Lay the figure out: per attacked update (round, client) a block of rows, the real image on top
    and one row per method below it, one column per p. Every reconstruction sits under the real image
    of its own outcome, never another client's. Returns (panels, ps, methods, outcome keys)."""
    ps = sorted({r["p"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = sorted({(r["round"], r["client"]) for r in rows})
    cell = {(r["p"], r["method"], r["round"], r["client"]): r for r in rows}
    out: list[Panel] = []
    for b, key in enumerate(keys):
        top = b * (len(methods) + 1)
        for c, p in enumerate(ps):
            truth = next((r["truth"] for m in methods if (r := cell.get((p, m, *key))) is not None), None)
            out.append(Panel(top, c, key, None, truth))
            for m, method in enumerate(methods):
                r = cell.get((p, method, *key))
                image = None if r is None else r["image"]
                psnr = None if r is None or image is None else float(r["psnr"])
                out.append(Panel(top + m + 1, c, key, method, image, psnr))
    return out, ps, methods, keys


def plot(rows: Sequence[dict[str, Any]], path: Path, caption: str = "") -> None:
    """Reconstructions (per attacked update: truth on top, one row per method; one column per p) and
    PSNR versus p per method (the mean over the attacked updates when there are several)."""
    laid, ps, methods, keys = panels(rows)
    nrows = len(keys) * (len(methods) + 1)
    fig = plt.figure(figsize=(1.5 * len(ps) + 4.8, 1.5 * nrows + 0.8))
    grid = fig.add_gridspec(nrows, len(ps) + 1, width_ratios=[1] * len(ps) + [2.6])
    for panel in laid:
        ax = fig.add_subplot(grid[panel.row, panel.col])
        _show(ax, panel.image)
        if panel.psnr is not None:
            ax.set_xlabel(f"{panel.psnr:.1f} dB", fontsize=8)
        if panel.row == 0:
            ax.set_title(f"p = {ps[panel.col]:g}", fontsize=9)
        if panel.col == 0:
            who = f"r{panel.key[0]} c{panel.key[1]}"
            ax.set_ylabel(f"truth {who}" if panel.method is None else LABELS.get(panel.method, panel.method),
                          fontsize=8)
    cell: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        cell.setdefault((r["p"], r["method"]), []).append(r)
    ax = fig.add_subplot(grid[:, -1])
    for method in methods:
        pts = [(p, sum(r["psnr"] for r in cell[(p, method)]) / len(cell[(p, method)])) for p in ps
               if (p, method) in cell]
        style = "--" if any(r["oracle"] for p, _ in pts for r in cell[(p, method)]) else "-"
        ax.plot([a for a, _ in pts], [b for _, b in pts], style, marker="o", label=LABELS.get(method, method))
    ax.set_xlabel("dropout probability p")
    ax.set_ylabel("PSNR (dB), higher = more leakage" + (f"\n(mean of {len(keys)} updates)" if len(keys) > 1 else ""))
    ax.set_xticks(ps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Dropout is not a defense (Scheliga et al., AAAI 2023)", fontsize=10)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.03 if caption else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_equal(scenario: Scenario) -> str:
    """One line naming what every attack of the figure shares (the parameters they all have, budget,
    knowledge other than the oracle's masks), so the figure states what it holds equal."""
    flat = [resolved_attack(a) for a in scenario.attacks]
    shared = [k for k in flat[0] if all(k in f and f[k] == flat[0][k] for f in flat[1:])]
    keep = [k for k in shared if k.startswith(("params.", "budget.iterations", "budget.restarts", "knowledge.labels"))]
    text = ", ".join(f"{k.split('.', 1)[1]} {flat[0][k]}" for k in keep)
    return f"Same for every attack: {text}. Columns differ only in p. {SCHEDULES}"


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``dia_sweep.csv`` and ``dia_sweep.json``: the scalar columns of ``rows``."""
    keys = ["p", "method", "round", "client", "oracle", "psnr", "mse", "iterations", "seconds", "failed"]
    table = [{k: r[k] for k in keys} for r in rows]
    with (out / "dia_sweep.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    (out / "dia_sweep.json").write_text(jsonio.dumps(table, indent=2), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--ps", default=",".join(f"{p:g}" for p in PS), help="comma-separated dropout probabilities")
    parser.add_argument("--iterations", type=int, default=None, help="override every attack's budget")
    parser.add_argument("--backend", default="inprocess", choices=["inprocess", "ray"])
    parser.add_argument("--out", default="runs/dia_sweep")
    args = parser.parse_args(argv)
    try:  # new, empty or an earlier figure folder: never files fedsim did not write
        out = claim_dir(Path(args.out), FIGURES, "--out", "figure folder")
    except FedsimError as err:
        parser.exit(2, f"error: {err}\n")
    start = time.perf_counter()
    with torch_threads(1):  # the measured numbers are for one thread; the caller keeps its count
        rows = sweep(args.scenario, [float(p) for p in args.ps.split(",")], args.iterations, args.backend)
    caption = held_equal(sweep_scenarios(args.scenario, [0.0], args.iterations)[0][1])
    print(caption)
    plot(rows, out / "dia_sweep.png", caption)
    write_tables(rows, out)
    for r in rows:
        print(f"p={r['p']:<5g} {r['method']:<20} r{r['round']} c{r['client']}  PSNR {r['psnr']:6.2f} dB  "
              f"MSE {r['mse']:.3g}  ({r['seconds']} s)")
    print(f"wrote {out / 'dia_sweep.png'} in {time.perf_counter() - start:.0f} s")
    return out / "dia_sweep.png"


if __name__ == "__main__":
    main()
