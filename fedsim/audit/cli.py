"""``fedsim audit SCENARIO``: is my epsilon real? One run with canaries, one without, one run directory.

The command adds (or overrides) the scenario's ``audit:`` block from its options, validates the result like
``fedsim validate`` (bad input: one line naming the YAML field, exit 2, nothing written), then

1. unless ``--no-baseline`` / ``audit.baseline: false``: runs the same scenario and seed WITHOUT canaries and
   without attacks (nothing written) for the test accuracy and loss the canaries are compared with;
2. runs the scenario with its canaries (:func:`fedsim.run.run_scenario`, which writes the ``audit`` block of
   ``metrics.json``), passing the baseline accuracy and loss, so the run directory (metrics.json, summary.md,
   report.html) is written once, atomically, as ``fedsim run`` writes it;
3. prints the accountants' epsilon beside the empirical lower bound and estimate (:mod:`fedsim.report.audit`).

Registered on the typer app in :mod:`fedsim.cli`. docs/auditing.md explains what the numbers prove.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsim.errors import FedsimError

console = Console(stderr=True)
EXIT_USER_ERROR = 2


def audit_overrides(canaries: int | None, level: str | None, confidence: float | None,
                    no_baseline: bool) -> list[str]:
    """The ``--set``-style overrides of the ``audit:`` block that the command's options stand for."""
    out = [f"audit.canaries={canaries}"] if canaries is not None else []
    out += [f"audit.level={level}"] if level is not None else []
    out += [f"audit.confidence={confidence}"] if confidence is not None else []
    return out + (["audit.baseline=false"] if no_baseline else [])


def load_audited(path: Path, overrides: list[str], audit_options: list[str]):  # noqa: ANN201 - a Scenario
    """Read ``path``, apply ``overrides`` (``--set``, ``--backend``), add an ``audit:`` block when it has none,
    apply ``audit_options`` and validate. Raises :class:`~fedsim.errors.ScenarioError` (one line, the field)."""
    from fedsim.scenario import parse_scenario
    from fedsim.yaml_input import apply_overrides, read_yaml

    raw = read_yaml(path)
    raw = apply_overrides(raw if raw is not None else {}, overrides)
    if isinstance(raw, dict) and raw.get("audit") is None:
        raw["audit"] = {}  # fedsim audit audits: the defaults of fedsim.audit.spec.AuditSpec
    return parse_scenario(apply_overrides(raw, audit_options) if isinstance(raw, dict) else raw)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal)


def _on_round(progress: Progress, label: str, rounds: int):  # noqa: ANN202 - a RoundCallback
    task = progress.add_task(label, total=rounds)

    def on_round(rnd: int, row: dict[str, float]) -> None:
        acc, loss = row.get("test_accuracy"), row.get("test_loss")
        text = f"{label}: round {rnd}/{rounds}" + (f"  acc {acc:.3f}" if acc is not None else
                                                   f"  loss {loss:.4g}" if loss is not None else "")
        progress.update(task, completed=rnd, description=text)

    return on_round


def audit_table(audit: Mapping[str, Any]) -> Table:
    """The closing table, one quantity a row (readable at 80 columns): mechanism, the three accountants' epsilon,
    the lower bound at its confidence (a bound), the two estimates [CI] (not bounds), the verdict, the accuracy with
    and without canaries; its caption says what a bound and an estimate can prove."""
    from fedsim.report.audit import MECHANISMS, READING, accuracy_near_chance, chance_note, fmt_num, loss_name

    eps, lb = audit.get("epsilon") or {}, audit.get("epsilon_lower_bound") or {}
    est, u = audit.get("epsilon_estimate") or {}, audit.get("utility") or {}
    two = audit.get("epsilon_estimate_two_variance") or {}

    def with_ci(block: Mapping[str, Any], note: str) -> str:
        if block.get("not_estimated"):
            return f"not estimated: {block['not_estimated']}"
        ci = list(block.get("ci") or []) + [None, None]
        return f"{fmt_num(block.get('value'))} [{fmt_num(ci[0])}, {fmt_num(ci[1])}] ({note})"

    conf = audit.get("confidence")
    mech = audit.get("mechanism")
    unrun = "--no-baseline / audit.baseline false"
    table = Table(title="Is epsilon real? (one-run audit; docs/auditing.md)", show_header=False,
                  caption=READING[0].upper() + READING[1:] + ".")
    table.add_column("", no_wrap=True)
    table.add_column("", overflow="fold")
    rows = [
        ("mechanism", f"{MECHANISMS.get(mech, mech)}, {audit.get('level')} canaries"
                      + (" + SecAgg" if audit.get("secure_aggregation") else "")
                      + f" ({audit.get('canaries_in')} of {audit.get('canaries')} included)"),
        ("eps Opacus", fmt_num(eps.get("opacus"))),
        ("eps dp_accounting RDP", fmt_num(eps.get("dp_accounting_rdp"))),
        ("eps dp_accounting PLD", fmt_num(eps.get("dp_accounting_pld"))),
        (f"lower bound @ {conf:.0%}" if isinstance(conf, float) else "lower bound",
         f"{fmt_num(lb.get('value'))} ({lb.get('correct')} of {lb.get('guesses')} guesses correct; a bound)"),
        ("estimate [CI]", with_ci(est, "pooled Gaussian fit; not a bound")),
        *([("2-variance estimate [CI]", with_ci(two, "Andrew et al.; not a bound, biased up"))] if two else []),
        ("verdict", str(audit.get("verdict"))),
        *([("accuracy with canaries", fmt_num(u.get("test_accuracy"))),
           ("accuracy without", fmt_num(u.get("baseline_test_accuracy")) + (
               f" (both {chance_note(u)})" if accuracy_near_chance(u) and u.get("accuracy_drop") is not None else
               f" (drop {fmt_num(u.get('accuracy_drop'))})" if u.get("accuracy_drop") is not None else
               f" (not run: {unrun})"))] if u.get("test_accuracy") is not None else []),
        (f"{loss_name(u)} with canaries", fmt_num(u.get("test_loss"), 4)
         + (" (the task has no accuracy)" if u.get("test_accuracy") is None else "")),
        (f"{loss_name(u)} without", fmt_num(u.get("baseline_test_loss"), 4) + (
            f" (increase {fmt_num(u.get('loss_increase'), 4)})" if u.get("loss_increase") is not None else
            f" (not run: {unrun})" if u.get("baseline_test_loss") is None else "")),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


def audit(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (its audit: block, if any, is the default)")],
    canaries: Annotated[int | None, typer.Option("--canaries", help="canaries m (audit.canaries)")] = None,
    level: Annotated[str | None, typer.Option("--level", help="auto, example or client (audit.level)")] = None,
    confidence: Annotated[float | None, typer.Option("--confidence", help="confidence of the lower bound and the "
                                                                          "interval (audit.confidence)")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the run without canaries (their cost "
                                                                    "in accuracy and loss is not reported)")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: key.path=value "
                                                                 "(repeatable)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default: output.dir/NAME-TIME); must "
                                                          "not exist or be empty")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier fedsim run directory at "
                                                                "--out")] = False,
    backend: Annotated[str | None, typer.Option(help="override backend.kind: ray or inprocess")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show Flower and Ray logs")] = False,
) -> None:
    """Is my epsilon real? Run the scenario with canaries (and once without), report accountant vs empirical eps."""
    from fedsim.isolation import command_threads

    command_threads((os.cpu_count() or 2) // 2)  # as fedsim run
    from fedsim.audit.baseline import baseline_scenario, baseline_utility
    from fedsim.report.writer import check_run_dir
    from fedsim.run import default_out_dir, run_scenario

    overrides = list(set_ or []) + ([f"backend.kind={backend}"] if backend else [])
    try:
        spec = load_audited(scenario, overrides, audit_overrides(canaries, level, confidence, no_baseline))
        target = out or default_out_dir(spec)
        check_run_dir(target, overwrite)  # refuse now, not after two federations
    except FedsimError as err:
        _fail(err)
    baseline: dict[str, float | None] | None = None
    progress = _progress()
    try:
        with progress:
            if spec.audit.baseline:
                base = run_scenario(baseline_scenario(spec), write=False, verbose=verbose,
                                    on_round=_on_round(progress, "baseline (no canaries)", spec.federation.rounds))
                baseline = baseline_utility(base.history)

            def attack_progress(label: str, total: int) -> Callable[[int, int], None]:
                task = progress.add_task(label, total=max(total, 1))
                return lambda done, tot: progress.update(task, completed=done, total=max(tot, 1))

            result = run_scenario(spec, target, verbose=verbose, overwrite=overwrite, audit_baseline=baseline,
                                  on_round=_on_round(progress, "with canaries", spec.federation.rounds),
                                  attack_progress=attack_progress)
    except FedsimError as err:
        _fail(err)
    _print_attacks(result.outcomes)
    block = getattr(result, "audit", None)
    if block:
        Console().print(audit_table(block))
    t = result.timing
    typer.echo(f"time: federation {t['federation_s']:.1f} s (with canaries), attacks {t['attacks_s']:.1f} s")
    typer.echo(f"wrote {result.out_dir}")


def _print_attacks(outcomes: list[Any]) -> None:
    """One line per attack outcome of the audited run (its PSNR, a text attack's exact seq./ROUGE/bag P/R, or why
    it has none)."""
    from fedsim.headline import is_text_summary, text_summary_line
    from fedsim.outcomes import outcome_label

    for o in outcomes:
        tag = f"{o.attack} round {o.round} client {o.partition_id}"
        psnr = o.metrics.get("psnr_mean")
        typer.echo(f"{tag}: {outcome_label(o.failed)}" if o.failed else
                   f"{tag}: PSNR {psnr:.2f} dB" if isinstance(psnr, int | float) else
                   f"{tag}: {text_summary_line(o.metrics)}" if is_text_summary(o.metrics) else f"{tag}: done")


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR))
