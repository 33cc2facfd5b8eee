"""The ``fedsim`` command line: run, validate, list.

Every user error (bad scenario, missing data, refused threat model) ends as one line on stderr and
exit code 2, with nothing written; ``-v`` shows Flower/Ray logs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsim.audit.cli import audit
from fedsim.bench.cli import bench
from fedsim.errors import FedsimError
from fedsim.priors.cli import prior_app
from fedsim.recovery import EXACT_LABEL, exact_count
from fedsim.report.cli import report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedsim: privacy attacks and defenses in simulated federated learning.")
app.add_typer(prior_app, name="prior")
console = Console(stderr=True)
EXIT_USER_ERROR = 2

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a field: key.path=value (repeatable)")]


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal)


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default: output.dir/NAME-TIME); must "
                                                          "not exist or be empty")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier fedsim run directory at --out "
                                                                "(never a directory fedsim did not write)")] = False,
    backend: Annotated[str | None, typer.Option(help="override backend.kind: ray or inprocess")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show Flower and Ray logs")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads in this process (default: half the "
                                                     "cores, at least 1)")] = None,
) -> None:
    """Run a scenario: federation, attacks, scores, report."""

    # Half the cores by default: small attack models gain little from more threads, and on a busy
    # machine (Ray actors, other jobs) oversubscribed torch threads slowed attacks 5-100x in our runs.
    from fedsim.isolation import command_threads

    command_threads(threads if threads is not None else (os.cpu_count() or 2) // 2)
    from fedsim.run import run_scenario
    from fedsim.scenario import load_scenario

    overrides = list(set_ or []) + ([f"backend.kind={backend}"] if backend else [])
    try:
        spec = load_scenario(scenario, overrides)
    except FedsimError as err:
        _fail(err)
    progress = _progress()
    with progress:
        rounds = progress.add_task("rounds", total=spec.federation.rounds)

        def on_round(rnd: int, row: dict[str, float]) -> None:
            acc, loss, obj = row.get("test_accuracy"), row.get("test_loss"), row.get("zo_objective")
            ppl = row.get("test_perplexity")
            text = f"round {rnd}/{spec.federation.rounds}" + (f"  ppl {ppl:.4g}" if ppl is not None else
                                                             f"  acc {acc:.3f}" if acc is not None else
                                                             f"  loss {loss:.4g}" if loss is not None else
                                                             f"  objective {obj:.4g}" if obj is not None else "")
            progress.update(rounds, completed=rnd, description=text)

        def attack_progress(label: str, total: int) -> Callable[[int, int], None]:
            task = progress.add_task(label, total=max(total, 1))
            return lambda done, tot: progress.update(task, completed=done, total=max(tot, 1))

        try:
            result = run_scenario(spec, out, verbose=verbose, on_round=on_round, attack_progress=attack_progress,
                                  overwrite=overwrite)
        except FedsimError as err:
            _fail(err)
    _print_result(result)


def _print_result(result) -> None:  # noqa: ANN001
    out = typer.echo
    evaluated = [h for h in result.history if "test_accuracy" in h]
    losses = [h for h in result.history if "test_loss" in h]  # a regression: test loss (MSE), no accuracy
    perplexity = [h for h in result.history if "test_perplexity" in h]  # language modeling
    if perplexity:
        out(f"test perplexity: {perplexity[0]['test_perplexity']:.4g} -> {perplexity[-1]['test_perplexity']:.4g}")
    if evaluated:
        what = "next-token accuracy" if perplexity else "test accuracy"
        out(f"{what}: {evaluated[0]['test_accuracy']:.3f} -> {evaluated[-1]['test_accuracy']:.3f}")
    elif losses:
        out(f"test loss: {losses[0]['test_loss']:.4g} -> {losses[-1]['test_loss']:.4g}")
    objective = [h for h in result.history if "zo_objective" in h]  # zeroth_order: the global F, by the evaluator
    if objective:
        out(f"global objective: {objective[0]['zo_objective']:.4g} -> {objective[-1]['zo_objective']:.4g} "
            f"({objective[-1]['zo_queries']:.0f} queries)")
    from fedsim.metrics.text import text_line
    from fedsim.outcomes import outcome_label, time_limit_note
    from fedsim.report.divergence import divergence_note

    diverged = divergence_note(result.history)
    if diverged is not None:
        out(f"warning: {diverged}")
    failed = result.client_failures
    if failed:  # the policy of fedsim.simulation.participation: survivors aggregated, every failure recorded
        first = failed[0]
        refused = [h["round"] for h in result.history if h.get("clients_refused") and not h.get("clients_aggregated")]
        what = (f"in round(s) {', '.join(f'{r:.0f}' for r in refused)} every client refused the model (nothing "
                "aggregated, the global model unchanged), other rounds" if refused else "those rounds")
        out(f"warning: {len(failed)} client failure(s) in {len({f['round'] for f in failed})} round(s); {what} "
            f"aggregated the other clients (summary.md lists all); client {first['client']} in round "
            f"{first['round']}: {first['reason']}")
    for o in result.outcomes:
        tag = f"{o.attack}{' (oracle)' if o.oracle else ''} round {o.round} client {o.partition_id}"
        if o.failed:  # "not attacked: ..." for a target without an update, never "failed (not attacked ...)"
            out(f"{tag}: {outcome_label(o.failed)}")
        elif "mi_accuracy" in o.metrics:  # model inversion of the released model (client -2)
            m = o.metrics
            out(f"{o.attack} round {o.round} released model: MI accuracy {m['mi_accuracy']:.2f}, kNN distance "
                f"{m.get('knn_distance') or float('nan'):.2f}  ({o.seconds:.1f} s)")
        elif "token_set_recall" in o.metrics:  # text (fedsim.metrics.text): ROUGE on token ids, or a bag's P/R
            out(f"{tag}: {text_line(o.metrics)}  ({o.seconds:.1f} s)")
        else:
            m = o.metrics
            acc = m.get("label_acc")  # absent when the attack returns no labels (imprint, trap weights): say nothing
            labels = (", labels given" if o.oracle_labels
                      else f", label acc {acc:.2f}" if acc is not None and math.isfinite(acc) else "")
            count = exact_count(m)  # the fraction's own denominator (batch + surplus images)
            exact = f" ({count} {EXACT_LABEL})" if count else ""
            out(f"{tag}: PSNR {m.get('psnr_mean', float('nan')):.2f} dB{exact}, "
                f"SSIM {m.get('ssim_mean', float('nan')):.3f}{labels}  ({o.seconds:.1f} s)")
            why = (getattr(o, "stats", None) or {}).get("nothing_isolated")
            if why:  # ran and isolated nothing: a measured 0, not a failure
                out(f"  nothing recovered: {why}")
        limited = None if o.failed else time_limit_note(getattr(o, "stats", None))
        if limited:  # stopped by budget.time_limit_s: scored, but its numbers depend on wall time
            out(f"  {limited}")
    if getattr(result, "audit", None):  # an audit: block: the bound vs the accountant (summary.md has the rest)
        from fedsim.report.audit import audit_line

        out(audit_line(result.audit))
    t = result.timing
    out(f"time: federation {t['federation_s']:.1f} s, attacks {t['attacks_s']:.1f} s")
    if result.out_dir is not None:
        out(f"wrote {result.out_dir}")


@app.command()
def validate(scenario: Annotated[Path, typer.Argument(help="scenario YAML")], set_: SetOption = None) -> None:
    """Check a scenario without running it."""
    from fedsim.errors import DataUnavailableError
    from fedsim.preflight import skipped_note
    from fedsim.scenario import load_scenario

    try:
        spec = load_scenario(scenario, list(set_ or []))
    except FedsimError as err:
        _fail(err)
    note = skipped_note(spec)
    if note is not None and not spec.data.download:  # the run refuses absent data it may not fetch: so do we
        _fail(DataUnavailableError(note))
    if note is not None:  # download: true; validation never downloads, the run fetches it (or stops in one line)
        console.print(f"note: the data is not on disk, so the checks that need it were skipped: {note}",
                      highlight=False, soft_wrap=True)
    zo = spec.zeroth_order  # a zeroth-order federation has its own method, task and message attacks
    what = (f"{zo.method} on the {zo.task.family} task" if zo is not None else
            f"{len(spec.attacks)} attack(s), {len(spec.defenses)} defense(s)")
    typer.echo(f"{scenario}: ok ({spec.name}: {what})")


@app.command("list")
def list_plugins() -> None:
    """Registered datasets, models, attacks and defenses."""
    from fedsim.data import DATASETS
    from fedsim.models import MODELS
    from fedsim.plugins import attack_registry, defense_registry
    from fedsim.threat_models import THREAT_MODELS, threat_model

    table = Table(title="fedsim registries")
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)  # whole names: they are what a scenario types
    table.add_column("what it is", overflow="fold", min_width=20)  # wide enough for "language_modeling" whole
    table.add_column("SoK", no_wrap=True)  # the letter; names in the legend below (a name would be cut at 80 columns)
    table.add_column("assumes", overflow="fold")  # fold, never cut: it names the field to set
    for name in DATASETS:
        table.add_row("dataset", name, _dataset_summary(name), "", "")
    for name in MODELS:
        table.add_row("model", name, _model_summary(name), "", "")
    for name, cls in attack_registry().items():
        table.add_row("attack", name, f"{'/'.join(cls.inputs)}: {cls.summary}", threat_model(cls.threat_model).letter,
                      "; ".join(cls.assumes))
    for name, cls in defense_registry().items():
        table.add_row("defense", name, getattr(cls, "summary", ""), "", "")
    for row in _zeroth_order_rows():
        table.add_row(*row, "", "")
    console = Console()
    console.print(table)
    console.print("SoK: the threat model an attack needs (its least letter; params and knowledge may raise it): "
                  + ", ".join(f"{tm.letter} {tm.name}" for tm in THREAT_MODELS.values()) + ".", soft_wrap=False)
    console.print(_threat_model_table())


def _threat_model_table() -> Table:
    """The SoK's threat-model letters (Carletti et al., USENIX Security 2025; docs/threat_models.md): what each
    grants and which scenario field grants it. An attack's letter is the least it needs; the base letter may rise
    with its params and knowledge (e.g. GradInversion is E only with ``bn_stats: running``)."""
    from fedsim.threat_models import BASIC, GRANTED_BY, THREAT_MODELS, UPDATES

    table = Table(title="SoK threat models (Carletti et al., USENIX Security 2025; docs/threat_models.md)")
    table.add_column("letter", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("capabilities", overflow="fold")
    table.add_column("scenario fields that grant it", overflow="fold")  # one field a line, folded, never cut
    table.add_column("applicability", no_wrap=True)
    for tm in THREAT_MODELS.values():
        caps = [c for c in (UPDATES, BASIC, *GRANTED_BY) if c in tm.capabilities]
        fields = dict.fromkeys(f"{GRANTED_BY[c][0].replace('attacks[{i}].', '')}: {GRANTED_BY[c][1]}"
                               for c in caps if c in GRANTED_BY)
        table.add_row(tm.letter, tm.name, ", ".join(caps), "\n".join(fields) or "(always granted)",
                      "*" * tm.applicability)
    return table


def _model_summary(name: str) -> str:
    """A text model's kind and the text datasets of its task (``fedsim.models.TEXT_MODELS``, the dataset facts),
    e.g. 'text: causal LM (kjv, wikitext-2)'; "" for the others."""
    from fedsim.data.catalog import FACTS
    from fedsim.models import TEXT_MODELS

    task = TEXT_MODELS.get(name)
    if task is None:
        return ""
    kind = {"language_modeling": "causal LM", "classification": "encoder classifier"}.get(task, task)
    datasets = sorted(d for d, f in FACTS.items() if f.inputs == "tokens" and f.task == task)
    return f"text: {kind}" + (f" ({', '.join(datasets)})" if datasets else "")


def _dataset_summary(name: str) -> str:
    """'image classification', 'tabular regression (8 features)', 'text language_modeling (token ids, ...)', plus
    the zeroth-order tasks that use it."""
    from fedsim.data import facts_of
    from fedsim.zo.tasks import adversarial, metric

    facts = facts_of(name)
    text = f"{facts.inputs} {facts.task}" + (f" ({facts.features} features)" if facts.features else "")
    if facts.inputs == "tokens":
        from fedsim.data.text import describe_text_dataset

        text = describe_text_dataset(name)
    zo = [t for t, mod in (("metric", metric), ("adversarial", adversarial)) if name in mod.DATASETS_OK]
    return text + (f"; zeroth-order task {' / '.join(zo)}" if zo else "")


def _zeroth_order_rows() -> list[tuple[str, str, str]]:
    """``federation.protocol: zeroth_order``: the task families, methods, message defenses and attacks (the
    ``zeroth_order`` block's choices)."""
    from fedsim.zo.spec import ZO_METHOD_SUMMARIES, MessageDefenses, ZOAttacks
    from fedsim.zo.tasks import TASKS

    rows = [("zo task", name, TASKS.get(name).summary) for name in TASKS]
    rows += [("zo method", name, text) for name, text in ZO_METHOD_SUMMARIES.items()]
    for kind, model in (("zo defense", MessageDefenses), ("zo attack", ZOAttacks)):
        rows += [(kind, name, field.description or "") for name, field in model.model_fields.items()
                 if kind == "zo defense" or field.annotation is bool]  # attacks: the switches, not every/heldout
    return rows


app.command("bench")(bench)


app.command("report")(report)


app.command("audit")(audit)


def main() -> None:
    """The ``fedsim`` entry point. A :class:`FedsimError` raised outside a command's own handling (a plug-in that
    fails to import while ``list`` fills the registries) still ends as one line and its exit code, no traceback."""
    try:
        app()
    except FedsimError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None


if __name__ == "__main__":
    main()
