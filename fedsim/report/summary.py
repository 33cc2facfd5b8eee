"""A short ``summary.md``: what ran, how useful the model became, how much each attack recovered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.augment import describe, scoring_note
from fedsim.outcomes import outcome_label, time_limit_note
from fedsim.recovery import EXACT_LABEL, EXACT_PSNR_DB, FRAC_EXACT_KEY, exact_count
from fedsim.report.audit import audit_markdown
from fedsim.report.client_checks import client_checks_markdown
from fedsim.report.divergence import divergence_note
from fedsim.report.manipulation import manipulation_markdown
from fedsim.report.participation import participation_markdown
from fedsim.report.privacy import privacy_markdown
from fedsim.report.stale_gi import summary_line as gi_summary_line
from fedsim.scenario import Scenario


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def summary_markdown(scenario: Scenario, history: Sequence[dict[str, float]], outcomes: Sequence[Any],
                     timing: dict[str, float], images: dict[str, str],
                     failures: Sequence[dict[str, Any]] | None = None,
                     privacy: dict[str, Any] | None = None,
                     client_metrics: Mapping[Any, Any] | None = None,
                     audit: Mapping[str, Any] | None = None,
                     text: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The run's summary.md; ``failures``: the federation's failed clients ({round, client, reason});
    ``client_metrics``: metrics.json's (round -> client -> metrics), for the client-side checks' flags;
    ``audit``: metrics.json's one-run audit block (:mod:`fedsim.report.audit`), shown after the privacy section;
    ``text``: a text run's outcome records (:func:`fedsim.report.text.text_records`), shown as the leakage section
    (recovered sentences beside the originals, ROUGE, token precision/recall) instead of the image table."""
    if scenario.zeroth_order is not None:  # a black-box task: no data, model or NN attacks (fedsim.zo.summary)
        from fedsim.zo.summary import zo_summary_markdown
        return zo_summary_markdown(scenario, history, timing, failures)
    fed = scenario.federation
    lines = [f"# {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description.strip(), ""]
    lines += [
        f"- data: `{scenario.data.dataset}` ({scenario.data.partition.kind} partition), "
        f"model: `{scenario.model.name}`",
        f"- federation: {fed.clients} clients, {fed.sampled_per_round} per round, {fed.rounds} rounds, "
        f"protocol `{fed.protocol}` (batch {fed.local.batch_size}, lr {fed.local.lr}), "
        f"backend `{scenario.backend.kind}`",
        *([f"- staleness: {_slow_text(fed.staleness)} train from the global model {fed.staleness.tau} rounds old "
           f"(aggregation `{fed.staleness.aggregation}`, schedule `{fed.staleness.schedule}`); "
           f"{_stale_count(history)}"]
          if fed.staleness is not None else []),
        *([f"- augmentation: {describe(fed.local.augmentation, scenario.data.dataset)}; "
           f"{scoring_note(fed.local.augmentation)}"] if fed.local.augmentation != "none" else []),
        f"- defenses: {', '.join(d.name for d in scenario.defenses) or 'none'}; seed {scenario.seed}",
        _threat_line(scenario),
        f"- time: federation {timing.get('federation_s', 0):.1f} s, attacks {timing.get('attacks_s', 0):.1f} s",
        "",
        "## Utility",
        "",
    ]
    evaluated = [h for h in history if "test_accuracy" in h]
    losses = [h for h in history if "test_loss" in h]  # a regression task has a test loss (MSE) and no accuracy
    perplexity = [h for h in history if "test_perplexity" in h]  # language modeling: the headline utility
    if perplexity:
        first, last = perplexity[0], perplexity[-1]
        lines.append(f"Test perplexity {first['test_perplexity']:.4g} (round {first['round']:.0f}) -> "
                     f"{last['test_perplexity']:.4g} (round {last['round']:.0f}); test loss {last['test_loss']:.4g} "
                     f"nats per token, next-token accuracy {first.get('test_accuracy', 0):.3f} -> "
                     f"{last.get('test_accuracy', 0):.3f}.")
    elif evaluated:
        first, last = evaluated[0], evaluated[-1]
        lines.append(f"Test accuracy {first['test_accuracy']:.3f} (round {first['round']:.0f}) -> "
                     f"{last['test_accuracy']:.3f} (round {last['round']:.0f}).")
        for k in scenario.evaluation.class_accuracy:
            key = f"test_accuracy_class{k}"
            lines.append(f"Test accuracy on class {k} {first[key]:.3f} -> {last[key]:.3f}.")
    elif losses:
        first, last = losses[0], losses[-1]
        lines.append(f"Test loss {first['test_loss']:.4g} (round {first['round']:.0f}) -> "
                     f"{last['test_loss']:.4g} (round {last['round']:.0f}); the task has no accuracy (regression: "
                     "mean squared error).")
    gi_line = gi_summary_line(list(history))  # federation.staleness gi_conversion: its estimates are reconstructions
    if gi_line is not None:
        lines.append(gi_line)
    diverged = divergence_note(history)
    if diverged is not None:  # a diverged model's accuracy change above is not learning: say so where it is read
        lines += ["", f"**Warning: {diverged}.**"]
    if "utility" in images:
        lines += ["", f"![utility]({images['utility']})"]
    lines += [""] + participation_markdown(history, failures)
    lines += manipulation_markdown(history, client_metrics)  # a malicious server's rounds: cost, clients' flags
    lines += client_checks_markdown(client_metrics)  # which clients flagged the model they received, and where
    lines += privacy_markdown(privacy, scenario.defenses)  # each epsilon from Opacus and from dp_accounting (RDP, PLD)
    lines += audit_markdown(audit, images.get("audit"))  # "Is epsilon real?": accountant vs empirical epsilon
    lines += ["## Leakage", ""]
    if text is not None:  # a text run: sentences and text metrics, no PSNR (fedsim.report.text)
        from fedsim.report.text import text_markdown

        curve = [f"![leakage over rounds]({images['leakage_rounds']})", ""] if "leakage_rounds" in images else []
        return "\n".join(lines + curve + text_markdown(list(text))) + "\n"
    inversions = [o for o in outcomes if o.truth is None and ("mi_accuracy" in o.metrics or o.partition_id == -2)]
    outcomes = [o for o in outcomes if o not in inversions]
    if inversions:
        lines += _inversion_table(inversions)
    if not outcomes and not inversions:
        lines.append("No attack ran.")
    elif outcomes:
        lines += [
            "PSNR/SSIM: higher means the attack recovered more (more leakage). LPIPS: lower means more. "
            "Reconstructions are matched one-to-one to the real batch before scoring; "
            f"recovered {EXACT_LABEL}: the share (count) of the batch recovered above {EXACT_PSNR_DB:g} dB PSNR, "
            "visually exact (a missing image is a miss). An exact image counts as 100 dB (PSNR's cap), so for "
            "attacks that recover images exactly (malicious server, analytic) the mean PSNR mostly restates that "
            f"share: compare them by recovered {EXACT_LABEL}, the headline, not by mean PSNR.",
            "",
            f"| attack | round | client | PSNR mean (dB) | PSNR best | recovered {EXACT_LABEL} | SSIM mean "
            "| LPIPS mean | label acc | time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for o in outcomes:
            m = o.metrics
            name = _named(o) + (" (oracle)" if o.oracle else "")
            lag = getattr(o, "staleness", 0)
            client = f"{o.partition_id} (update {lag} round{'s' * (lag != 1)} stale)" if lag > 0 else o.partition_id
            if o.failed:
                row = f"| {name} | {o.round} | {client} | {outcome_label(o.failed)} | | | | | | {o.seconds:.1f} |"
                lines.append(row)
                continue
            labels = "given" if getattr(o, "oracle_labels", False) else _fmt(m.get("label_acc"))
            limited = " (time-limited)" if time_limit_note(getattr(o, "stats", None)) else ""  # notes say more
            lines.append(
                f"| {name} | {o.round} | {client} | {_fmt(m.get('psnr_mean'))}{limited} | {_fmt(m.get('psnr_best'))} | "
                f"{_exact(m)} | {_fmt(m.get('ssim_mean'), 3)} | {_fmt(m.get('lpips_mean'), 3)} | {labels} | "
                f"{o.seconds:.1f} |"
            )
        lines += _oracle_notes(outcomes)
    if "leakage_rounds" in images:
        lines += ["", f"![leakage over rounds]({images['leakage_rounds']})"]
    if "reconstructions" in images:
        lines += ["", f"![reconstructions]({images['reconstructions']})"]
    return "\n".join(lines) + "\n"


def _exact(metrics: dict[str, Any]) -> str:
    """``0.62 (40/64)``: the share and count of the batch recovered above 40 dB (``fedsim.recovery``), the count over
    the share's own denominator (:func:`exact_count`: batch + surplus images); ``-`` when a metrics.json written
    before it has no such key."""
    share, count = metrics.get(FRAC_EXACT_KEY), exact_count(metrics)
    if not isinstance(share, int | float):
        return "-"
    return f"{share:.2f} ({count})" if count else f"{share:.2f}"


def _oracle_notes(outcomes: Sequence[Any]) -> list[str]:
    """Why each oracle row is one, what "given" labels mean (decided by the runner, not the attacks), and why a row
    that ran recovered nothing (the attack's ``stats["nothing_isolated"]``)."""
    notes = sorted({f"- {o.attack} (oracle, an upper bound that used ground truth): {'; '.join(o.oracle_reasons)}"
                    for o in outcomes if o.oracle and getattr(o, "oracle_reasons", ())})
    if any(getattr(o, "oracle_labels", False) for o in outcomes):
        notes.append("- label acc \"given\": the threat model handed the attack the true labels "
                     "(knowledge.labels: known), so no label accuracy is reported.")
    for o in outcomes:  # an attack that ran and isolated nothing: a measured 0, not a failure (Reconstruction)
        why = (getattr(o, "stats", None) or {}).get("nothing_isolated")
        if why and not o.failed:
            notes.append(f"- {o.attack} round {o.round} client {o.partition_id}: nothing recovered, a measured 0 "
                         f"(the attack ran; not a failure): {why}")
    for o in outcomes:  # stopped by budget.time_limit_s: scored, but the numbers depend on wall time
        limited = None if o.failed else time_limit_note(getattr(o, "stats", None))
        if limited:
            notes.append(f"- {o.attack} round {o.round} client {o.partition_id}: {limited} (machine load; serial "
                         "and ray attack execution may differ)")
    if any(o.metrics.get("count_mismatch") for o in outcomes if not o.failed):
        notes.append("- count mismatch: the attack reconstructed the count the client declared (under DP-SGD "
                     "the expected batch size) and the real batch was smaller; each surplus image is scored as "
                     "a blind guess in the means.")
    return ["", *notes] if notes else []


def _inversion_table(outcomes: Sequence[Any]) -> list[str]:
    """Model inversion of the released model: judged by an independent evaluation classifier."""
    lines = [
        "Model inversion of the released global model, judged by an independent evaluation classifier "
        "(MI accuracy: share of inverted images it assigns to the target class; kNN distance: to the "
        "closest real image of that class in its feature space, lower = closer).",
        "",
        "| attack | model after round | MI accuracy | top-5 | kNN distance | target confidence | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        m = o.metrics
        if o.failed or m.get("failed"):
            lines.append(f"| {_named(o)} | {o.round} | {outcome_label(o.failed or m.get('failed'))} | | | | "
                         f"{o.seconds:.1f} |")
            continue
        limited = time_limit_note(getattr(o, "stats", None))
        lines.append(f"| {_named(o)} | {o.round} | {_fmt(m.get('mi_accuracy'))}"
                     f"{f' ({limited})' if limited else ''} | {_fmt(m.get('mi_top5'))} | "
                     f"{_fmt(m.get('knn_distance'))} | {_fmt(m.get('target_confidence'), 3)} | {o.seconds:.1f} |")
    return lines + [""]


def _named(outcome: Any) -> str:
    """``inverting_gradients [SoK B]``: the attack with the SoK letter it exercised (``fedsim.threat_models``), and
    ``[SoK F: on the model manipulated by fishing]`` when it attacked a model another attack manipulated."""
    from fedsim.threat_models import sok_tag

    by = getattr(outcome, "manipulated_by", None)
    return outcome.attack + sok_tag(getattr(outcome, "threat_model", ""), by[1] if by else None)


def _threat_line(scenario: Scenario) -> str:
    """``- threat model: server `honest_but_curious`; inverting_gradients needs B, granted C``: what each attack
    needed and the strongest SoK letter the scenario granted it (docs/threat_models.md)."""
    from fedsim.threat_models import THREAT_MODELS, threat_model_record

    record = threat_model_record(scenario)
    parts = [f"{a['attack']} needs {THREAT_MODELS[a['needed']].describe()}, granted {a['granted']}"
             for a in record["attacks"]]
    head = f"- threat model (SoK letters): server `{record['server_role']}`"
    return head + (f"; {'; '.join(parts)}" if parts else "")


def _slow_text(stale) -> str:  # noqa: ANN001 - a StalenessSpec
    """Which clients are slow, in words: their ids, or the clients holding most of a class."""
    if stale.slow_clients is not None:
        return f"clients {', '.join(map(str, stale.slow_clients))}"
    return f"the {stale.num_slow} client(s) with the most examples of class {stale.slow_class}"


def _stale_count(history) -> str:  # noqa: ANN001 - the run's rows
    """How many stale updates arrived (``clients_stale`` summed), or that none ever did."""
    n = int(sum(float(h.get("clients_stale") or 0) for h in history))
    return f"{n} stale update(s) arrived" if n else "no client was ever stale in this run (nothing was late)"
