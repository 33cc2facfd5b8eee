"""``fedsim prior``: train a GAN image prior from a YAML config, and draw a grid of its samples.

Registered in :mod:`fedsim.cli` as ``app.add_typer(prior_app, name="prior")``. Bad input (config
fields, missing data, a file that is not a prior) ends as one line naming the problem and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedsim.errors import FedsimError

prior_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Train and inspect GAN image priors (for GAN-prior attacks such as GIFD).")
console = Console(stderr=True)
EXIT_USER_ERROR = 2


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR))


@prior_app.command()
def train(
    config: Annotated[Path, typer.Argument(help="prior-training YAML (see scenarios/priors/)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: key.path=value")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="prior file to write (default: output)")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="override training.steps")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads (weights are reproducible "
                                                                   "for a fixed thread count)")] = 1,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore an existing checkpoint and start over")] = False,
) -> None:
    """Train a DCGAN prior; an interrupted run resumes from its checkpoint when rerun."""
    from fedsim.isolation import command_threads
    from fedsim.priors.config import load_prior_config
    from fedsim.priors.train import train_prior

    command_threads(threads)
    overrides = list(set_ or []) + ([f"training.steps={steps}"] if steps is not None else [])
    try:
        spec = load_prior_config(config, overrides)
    except FedsimError as err:
        _fail(err)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    with progress:
        task = progress.add_task(f"training {spec.name}", total=spec.training.steps)

        def on_step(step: int, total: int, losses: dict[str, float]) -> None:
            text = f"{spec.name}  D {losses['loss_d']:.3f}  G {losses['loss_g']:.3f}"
            progress.update(task, completed=step, total=total, description=text)

        try:
            result = train_prior(spec, out, progress=on_step, resume=not fresh)
        except FedsimError as err:
            _fail(err)
    meta = result.prior.meta
    if result.resumed_from == result.steps:
        typer.echo(f"{result.path} is already trained ({result.steps} steps); --fresh retrains it")
        return
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    typer.echo(f"trained {result.steps} steps in {result.seconds:.1f} s{resumed} on {meta.data_note}")
    typer.echo(f"wrote {result.path}")


@prior_app.command()
def sample(
    prior: Annotated[str, typer.Argument(help="a prior file or a shipped prior's name (mnist-dcgan)")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write (an existing file only if fedsim wrote it)")]
    = Path("prior_samples.png"),
    n: Annotated[int, typer.Option("--n", min=1, max=1024, help="number of samples")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="latent seed")] = 0,
) -> None:
    """Write a grid of ``n`` samples of a prior (eval mode) to a PNG."""
    from fedsim.priors.sampling import save_sample_grid
    from fedsim.priors.store import load_prior

    try:
        loaded = load_prior(prior)
        path = save_sample_grid(loaded, out, n=n, seed=seed)
    except FedsimError as err:
        _fail(err)
    typer.echo(f"wrote {path} ({n} samples of {loaded.meta.dataset} prior, {loaded.meta.steps} steps)")
