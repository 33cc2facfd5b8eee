"""``fedsim report RUN_OR_BENCH_DIR``: write the self-contained HTML report of a run or benchmark directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsim.errors import FedsimError

EXIT_USER_ERROR = 2


def report(
    source: Annotated[Path, typer.Argument(help="a run directory (metrics.json) or a bench directory (cells.jsonl)")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: SOURCE/report.html); "
                                                            "its PNGs and leaderboard.csv go in a folder of the "
                                                            "same name")] = None,
) -> None:
    """Write one self-contained HTML report (leaderboard, frontier, rounds, galleries) and print its path."""

    from fedsim.isolation import command_threads

    command_threads(1)  # nothing here is heavy; stay polite on a shared machine
    from fedsim.report.html import render_report
    from fedsim.report.writer import clear_report_failure

    try:
        path = render_report(source, out)
        if path.resolve() == (source / "report.html").resolve():  # the run's own report.html: now drawn
            clear_report_failure(source)
    except FedsimError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None
    typer.echo(str(path))
