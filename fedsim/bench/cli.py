"""``fedsim bench GRID.yaml``: run an attack x defense grid, resumably (registered in :mod:`fedsim.cli`).

Default output: ``runs/bench-<grid name>`` (relative to the current directory, no timestamp), so
rerunning the same command after a crash or Ctrl-C resumes where it stopped. Bad grids exit with
code 2 and one line naming the grid field, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsim.errors import FedsimError
from fedsim.headline import is_text_summary, text_summary_line
from fedsim.recovery import EXACT_LABEL, FRAC_EXACT_KEY

console = Console(stderr=True)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def default_bench_dir(name: str) -> Path:
    return Path("runs") / f"bench-{name}"


def _describe(record: dict) -> str:
    s = record.get("summary") or {}
    head = f"{record['attack']} x {record['defense']}" + (f" {record['params']}" if record["params"] else "")
    head += f" (repeat {record['repeat']})"
    if record["status"] != "ok":
        return f"{head}: FAILED {record['error']}"
    psnr, exact = s.get("psnr_mean"), s.get(FRAC_EXACT_KEY)  # exact: share of the batch above 40 dB (if recorded)
    acc, loss = s.get("test_accuracy"), s.get("test_loss")  # a regression has a test loss and no accuracy
    utility = f", acc {acc:.3f}" if acc is not None else f", test loss {loss:.4g}" if loss is not None else ""
    diverged = s.get("training_diverged")  # a diverged cell's figures describe a broken model: say so on its line
    text = text_summary_line(s) if is_text_summary(s) else ""  # a text cell: exact seq., ROUGE, bag P/R + baseline
    leak = f"PSNR {psnr:.2f} dB" if psnr is not None else text or "no leakage metric"
    return f"{head}: {leak}" + (
        f", {exact:.0%} {EXACT_LABEL}" if isinstance(exact, int | float) else "") + utility + (
        f"  ({record['seconds']:.1f} s)") + (f"  DIVERGED: {diverged}" if diverged else "") + (
        f"  TIME-LIMITED: {limited} attack run(s) stopped by budget.time_limit_s"
        if (limited := s.get("attacks_time_limited")) else "")


def bench(
    grid: Annotated[Path, typer.Argument(help="grid YAML (see benchmarks/grids/)")],
    out: Annotated[Path | None, typer.Option("--out", help="bench directory (default: runs/bench-NAME); "
                                                           "an existing one is resumed")] = None,
    executor: Annotated[str, typer.Option(help="ray (cells as parallel Ray tasks) or serial (this process)")] = "ray",
    max_parallel: Annotated[int | None, typer.Option(min=1, help="cells in flight at once (default: the grid's "
                                                          "max_parallel, else as many as Ray's CPUs allow)")] = None,
    address: Annotated[str | None, typer.Option(help="join an existing Ray cluster ('auto', 'ray://host:10001')")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a grid field: key.path=value "
                                                                 "(e.g. repeats=1, base.federation.rounds=2)")] = None,
    retry_failed: Annotated[bool, typer.Option(help="rerun the cells recorded as failed")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="expand and validate every cell, then stop: nothing "
                                                            "is run or written")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show Flower and Ray logs")] = False,
) -> None:
    """Run an attack x defense grid; finished cells are kept and skipped on a rerun."""

    from fedsim.isolation import command_threads

    command_threads(1)  # the driver only schedules; each cell sets its own threads (resources.num_cpus)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedsim.bench.expand import expand_grid, shadowed_overrides
    from fedsim.bench.grid import load_grid
    from fedsim.bench.runner import BenchProgress, check_bench, executor_notes, run_bench

    overrides = list(set_ or []) + ([f"ray.address={address}"] if address else [])
    try:
        spec = load_grid(grid, overrides)
        cells = expand_grid(spec)
        ignored, partly = shadowed_overrides(cells, list(set_ or []))
        if ignored:  # a --set the grid replaces in every cell would be silently without effect
            raise ignored[0]
        if dry_run:  # the run's own checks (run_bench repeats them): what passes, runs
            check_bench(spec, cells, executor, max_parallel)
    except FedsimError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None
    for line in partly + executor_notes(spec, executor):
        console.print(line, highlight=False, soft_wrap=True)
    if dry_run:
        typer.echo(f"{grid}: ok ({spec.name}: {len(cells)} cells validated for --executor {executor}, "
                   f"{len(spec.attacks)} attack(s) x "
                   f"{len(spec.defenses)} defense entr{'y' if len(spec.defenses) == 1 else 'ies'}, "
                   f"{spec.repeats} repeat(s)); dry run: nothing run or written")
        return
    out_dir = out or default_bench_dir(spec.name)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    task = progress.add_task("cells", total=len(cells))

    def start(total: int, skipped: int) -> None:
        console.print(f"{spec.name}: {total} cells, {skipped} skipped (already in {out_dir}/cells.jsonl), "
                      f"{total - skipped} to run ({executor})", highlight=False, soft_wrap=True)
        progress.reset(task, total=total, completed=skipped)  # the ETA counts only cells run now

    def cell(record: dict) -> None:
        progress.advance(task)
        progress.console.print(_describe(record), highlight=False, soft_wrap=True)

    try:
        with progress:
            result = run_bench(spec, out_dir, executor, BenchProgress(start, cell), max_parallel,
                               retry_failed=retry_failed, verbose=verbose, cells=cells)
    except FedsimError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None
    except KeyboardInterrupt:
        console.print(f"interrupted: finished cells are in {out_dir}/cells.jsonl; rerun the same command to resume",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    diverged = sum(1 for r in result.records if (r.get("summary") or {}).get("training_diverged"))
    typer.echo(f"ran {len(result.records)} cells ({result.failed} failed"
               + (f", {diverged} with diverged training" if diverged else "")
               + f"), skipped {result.skipped}; results in {result.out_dir}")
    typer.echo(f"next: fedsim report {out_dir}")
