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
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "tutorial" / "05_dropout_is_not_a_defense.yaml"
PS = (0.0, 0.1, 0.25, 0.5)
LABELS = {"inverting_gradients": "Inverting Gradients", "dia": "DIA", "dia_oracle": "oracle (true masks)"}


def sweep(
    scenario: Path | str = SCENARIO,
    ps: Sequence[float] = PS,
    iterations: int | None = None,
    backend: str | None = "inprocess",
) -> list[dict[str, Any]]:
    """Run the scenario once per p; one row per (p, attack) with metrics and the images."""
    rows: list[dict[str, Any]] = []
    for p in ps:
        overrides = [f"model.dropout={p}"]
        if iterations is not None:
            base = load_scenario(scenario)
            overrides += [f"attacks.{i}.budget.iterations={iterations}" for i in range(len(base.attacks))]
        result = run_scenario(load_scenario(scenario, overrides), write=False, backend=backend)
        for outcome in result.outcomes:
            rows.append({
                "p": float(p),
                "method": outcome.attack,
                "oracle": outcome.oracle,
                "psnr": outcome.metrics.get("psnr_mean", float("nan")),
                "mse": outcome.metrics.get("mse_mean", float("nan")),
                "iterations": outcome.stats.get("iterations", float("nan")),
                "seconds": round(outcome.seconds, 2),
                "failed": outcome.failed,
                "image": outcome.reconstruction,
                "truth": outcome.truth,
            })
    return rows


def _show(ax: Any, image: torch.Tensor | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "failed", ha="center", va="center", fontsize=8)
        return
    x = image[0].detach().clamp(0, 1).cpu()
    ax.imshow(x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy(), cmap="gray" if x.shape[0] == 1 else None,
              vmin=0, vmax=1)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Reconstructions (truth on top, one row per method, one column per p) and PSNR versus p."""
    ps = sorted({r["p"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["p"], r["method"]): r for r in rows}
    fig = plt.figure(figsize=(1.5 * len(ps) + 4.8, 1.5 * (len(methods) + 1) + 0.4))
    grid = fig.add_gridspec(len(methods) + 1, len(ps) + 1, width_ratios=[1] * len(ps) + [2.6])
    for c, p in enumerate(ps):
        first = next(r for r in rows if r["p"] == p)
        ax = fig.add_subplot(grid[0, c])
        _show(ax, first["truth"])
        ax.set_title(f"p = {p:g}", fontsize=9)
        if c == 0:
            ax.set_ylabel("truth", fontsize=8)
        for m, method in enumerate(methods):
            ax = fig.add_subplot(grid[m + 1, c])
            r = cell.get((p, method))
            _show(ax, None if r is None else r["image"])
            if r is not None and r["image"] is not None:
                ax.set_xlabel(f"{r['psnr']:.1f} dB", fontsize=8)
            if c == 0:
                ax.set_ylabel(LABELS.get(method, method), fontsize=8)
    ax = fig.add_subplot(grid[:, -1])
    for method in methods:
        pts = [(p, cell[(p, method)]["psnr"]) for p in ps if (p, method) in cell]
        style = "--" if any(cell[(p, method)]["oracle"] for p, _ in pts) else "-"
        ax.plot([a for a, _ in pts], [b for _, b in pts], style, marker="o", label=LABELS.get(method, method))
    ax.set_xlabel("dropout probability p")
    ax.set_ylabel("PSNR (dB), higher = more leakage")
    ax.set_xticks(ps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Dropout is not a defense (Scheliga et al., AAAI 2023)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``dia_sweep.csv`` and ``dia_sweep.json``: the scalar columns of ``rows``."""
    keys = ["p", "method", "oracle", "psnr", "mse", "iterations", "seconds", "failed"]
    table = [{k: r[k] for k in keys} for r in rows]
    with (out / "dia_sweep.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    (out / "dia_sweep.json").write_text(json.dumps(table, indent=2), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--ps", default=",".join(f"{p:g}" for p in PS), help="comma-separated dropout probabilities")
    parser.add_argument("--iterations", type=int, default=None, help="override every attack's budget")
    parser.add_argument("--backend", default="inprocess", choices=["inprocess", "ray"])
    parser.add_argument("--out", default="runs/dia_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = sweep(args.scenario, [float(p) for p in args.ps.split(",")], args.iterations, args.backend)
    plot(rows, out / "dia_sweep.png")
    write_tables(rows, out)
    for r in rows:
        print(f"p={r['p']:<5g} {r['method']:<20} PSNR {r['psnr']:6.2f} dB  MSE {r['mse']:.3g}  ({r['seconds']} s)")
    print(f"wrote {out / 'dia_sweep.png'} in {time.perf_counter() - start:.0f} s")
    return out / "dia_sweep.png"


if __name__ == "__main__":
    main()
