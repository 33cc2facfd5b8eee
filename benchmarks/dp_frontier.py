"""DP methods at matched epsilon: run ``benchmarks/grids/dp_frontier.yaml``, print ONE frontier table, write the report.

The grid runs each DP method (DP-SGD, DP-SAT, DP-SAM, DIFF2, central DP; whichever the grid lists) at
target epsilon 1, 3 and 8 (delta 1e-5) on the same seeds, beside a run without DP, with Inverting
Gradients on client 0's round-1 update. It is an ordinary ``fedsim bench`` grid: its cells land in
``runs/bench-dp_frontier`` (rerunning resumes after a crash), and ``fedsim report`` renders the same
table and the utility-against-epsilon figure (section "DP methods at matched ε"). The table
(:func:`fedsim.report.dp_frontier.text_table`) gives per method and target: epsilon from Opacus's
accountant and from dp_accounting (RDP, PLD), the epsilon level, test accuracy (or test loss) mean ± std
over seeds, the federation's wall time and its ratio to DP-SGD's at the same target, and the strongest
attack's PSNR. Cells run one after another in this process (one torch thread each), so wall times are
comparable; on a shared machine they still move with its load.

    OMP_NUM_THREADS=1 python benchmarks/dp_frontier.py [--out DIR] [--set repeats=1] [--grid GRID.yaml]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

GRID = Path(__file__).parent / "grids" / "dp_frontier.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--out", type=Path, default=None, help="bench directory (default runs/bench-<grid name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="grid override key.path=value (e.g. repeats=1), repeatable")
    parser.add_argument("--no-report", action="store_true", help="print the table only")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from fedsim.bench.cli import default_bench_dir
    from fedsim.bench.grid import load_grid
    from fedsim.bench.runner import BenchProgress, run_bench
    from fedsim.isolation import command_threads
    from fedsim.report.dp_frontier import frontier_rows, text_table
    from fedsim.report.loading import load_source

    command_threads(1)
    grid = load_grid(args.grid, args.overrides)
    out = args.out or default_bench_dir(grid.name)
    start = time.perf_counter()

    def started(total: int, skipped: int) -> None:
        print(f"{grid.name}: {total} cells, {skipped} already in {out}, {total - skipped} to run", flush=True)

    def finished(record: dict) -> None:
        s = record.get("summary") or {}
        print(f"  {record['defense']} repeat {record['repeat']}: {record['status']}"
              f" acc {s.get('test_accuracy')} eps {s.get('epsilon')} ({record['seconds']:.1f} s)", flush=True)

    result = run_bench(grid, out, "serial", BenchProgress(started, finished))
    print(f"ran {len(result.records)} cells ({result.failed} failed) in {time.perf_counter() - start:.0f} s\n")
    print(text_table(frontier_rows(load_source(result.out_dir).cells)))
    if not args.no_report:
        from fedsim.report.html import render_report

        print(f"report: {render_report(result.out_dir)}")


if __name__ == "__main__":
    main()
