""""Is epsilon real? (one-run audit)": the ``audit`` block of ``metrics.json`` in summary.md, report.html and a figure.

The block (:mod:`fedsim.audit.scoring`) holds the accountants' epsilon of one canary's unit beside the empirical
lower bound (Steinke, Nasr, Jagielski, NeurIPS 2023: a BOUND) and two Gaussian-fit ESTIMATES with their bootstrap
intervals (the pooled mu-GDP fit, the headline; Andrew et al. ICLR 2024's two-variance fit, biased upward). Every
row says which figure is a bound and which an estimate, and :data:`READING` says what each can prove. This module
only words and draws it: every number shown is a copy from the block.
Nothing is shown for a run without the block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by CLIs, CI and Ray drivers
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.report.page import esc, facts, figure  # noqa: E402

TITLE = "Is epsilon real? (one-run audit)"
FIGURE_NAME = "audit_scores.png"
CONSISTENT = "the accountant's epsilon was not contradicted; the gap is the worst case vs this run"
VIOLATION = "the implementation leaks more than its accountant claims: a bug"
READING = ("only the lower bound proves anything (above the accountant's epsilon: a bug); an estimate above the "
           "accountant's epsilon proves nothing, it is a noisy best guess under a Gaussian model of the scores")
MECHANISMS = {
    "dp_sgd": "DP-SGD (sample-level)", "dp_sat": "DP-SAT (sample-level)", "dp_sam": "DP-SAM (sample-level)",
    "diff2": "DIFF2 (sample-level)", "central_dp": "central DP (client-level)", "none": "no DP mechanism",
}


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number as text: ``inf`` for an infinite epsilon (no noise: nothing is claimed), ``-`` when absent."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def audit_of(metrics: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The ``audit`` block of a metrics.json mapping, or None when the run was not audited."""
    block = metrics.get("audit") if isinstance(metrics, Mapping) else None
    return block if isinstance(block, Mapping) else None


def smallest_epsilon(audit: Mapping[str, Any]) -> float | None:
    """The smallest accountant epsilon of the block (what the verdict compares the lower bound with)."""
    values = [v for v in (audit.get("epsilon") or {}).values()
              if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)]
    return min(values) if values else None


def mechanism_text(audit: Mapping[str, Any]) -> str:
    """``DP-SGD (sample-level) with example canaries (...), under secure aggregation``: the parenthesis says
    whether the canaries went through the mechanism's clipping (``canaries_clipped_by_mechanism``)."""
    mech = audit.get("mechanism")
    text = MECHANISMS.get(mech, str(mech)) if isinstance(mech, str) else "?"
    text += f" with {audit.get('level')} canaries"
    clipped = audit.get("canaries_clipped_by_mechanism")
    if clipped is True:
        text += (" (their per-example gradients, of norm 10x the clipping norm, go through the mechanism's own "
                 "clipping)")
    elif clipped is False:
        text += (" (added AFTER the clipping, at the clipping norm: ghost clipping forms no per-example gradients, so "
                 "this audit does not test the clip)")
    return text + (", under secure aggregation" if audit.get("secure_aggregation") else "")


def epsilon_text(audit: Mapping[str, Any]) -> str:
    """``4.100 (Opacus), 4.120 (dp_accounting RDP), 3.500 (dp_accounting PLD) at delta 1e-05``."""
    eps = audit.get("epsilon") or {}
    return (f"{fmt_num(eps.get('opacus'))} (Opacus), {fmt_num(eps.get('dp_accounting_rdp'))} (dp_accounting RDP), "
            f"{fmt_num(eps.get('dp_accounting_pld'))} (dp_accounting PLD) at delta {audit.get('delta')}")


def lower_bound_text(audit: Mapping[str, Any]) -> str:
    """``0.420 at 95% confidence (Steinke et al. 2023 one-run: 16 of 20 guesses correct)``."""
    lb = audit.get("epsilon_lower_bound") or {}
    conf = audit.get("confidence")
    at = f"{conf:.0%}" if isinstance(conf, int | float) else "?"
    return (f"{fmt_num(lb.get('value'))} at {at} confidence ({lb.get('method')}: {lb.get('correct')} of "
            f"{lb.get('guesses')} guesses correct)")


def estimate_text(audit: Mapping[str, Any], key: str = "epsilon_estimate") -> str:
    """``1.300 [0.600, 2.100] (95% CI; <method>; an estimate, not a bound)`` for the block's ``key`` estimate."""
    est = audit.get(key) or {}
    if est.get("not_estimated"):
        return f"not estimated: {est['not_estimated']}"
    ci = est.get("ci") or [None, None]
    lo, hi = (ci + [None, None])[:2] if isinstance(ci, list) else (None, None)
    conf = audit.get("confidence")
    at = f"{conf:.0%} " if isinstance(conf, int | float) else ""
    return (f"{fmt_num(est.get('value'))} [{fmt_num(lo)}, {fmt_num(hi)}] ({at}CI; {est.get('method')}; an estimate, "
            "not a bound)")


def verdict_text(audit: Mapping[str, Any]) -> str:
    """The verdict in plain words (``violation``: a bug; ``consistent``: not contradicted)."""
    verdict = audit.get("verdict")
    low = smallest_epsilon(audit)
    if verdict == "violation":
        return (f"VIOLATION: the lower bound {fmt_num((audit.get('epsilon_lower_bound') or {}).get('value'))} exceeds "
                f"the smallest accountant epsilon {fmt_num(low)}: {VIOLATION}")
    if verdict == "consistent":
        if low is not None and math.isinf(low):
            return ("consistent: no noise, so the accountant claims nothing (epsilon inf); the lower bound shows "
                    "what the audit can detect")
        return f"consistent: {CONSISTENT}"
    return f"unknown verdict {verdict!r}"


NEAR_CHANCE = 1.5  # accuracies below this many times the uniform guess's: the model has not learned


def accuracy_near_chance(utility: Mapping[str, Any]) -> bool:
    """True when every measured accuracy (with the canaries, and without them when run) is below
    :data:`NEAR_CHANCE` x ``chance_accuracy`` (1 / classes): the model has not learned, so a difference between the
    two is noise and says nothing about the canaries' cost."""
    chance = utility.get("chance_accuracy")
    accs = [utility.get(k) for k in ("test_accuracy", "baseline_test_accuracy")]
    known = [a for a in accs if isinstance(a, int | float) and not isinstance(a, bool)]
    return (isinstance(chance, int | float) and isinstance(accs[0], int | float)
            and all(a < NEAR_CHANCE * chance for a in known))


def chance_note(utility: Mapping[str, Any]) -> str:
    """``below 1.5x chance (0.100): the model has not learned, so the accuracy comparison says nothing``."""
    return (f"below {NEAR_CHANCE:g}x chance ({fmt_num(utility.get('chance_accuracy'))}): the model has not learned, "
            "so the accuracy comparison is uninformative")


def loss_name(utility: Mapping[str, Any]) -> str:
    """``test MSE`` for a regression (no accuracy), else ``test loss`` (a classification's cross-entropy)."""
    return "test MSE" if utility.get("test_accuracy") is None else "test loss"


def loss_text(utility: Mapping[str, Any], same: str = "") -> str:
    """``test MSE 0.0400 with the canaries, 0.0360 without{same}: increase 0.0040`` (or why the baseline is
    absent)."""
    loss, base, up = utility.get("test_loss"), utility.get("baseline_test_loss"), utility.get("loss_increase")
    name = loss_name(utility)
    if not isinstance(loss, int | float):
        return f"{name} not evaluated"
    if not isinstance(base, int | float):
        return f"{name} {fmt_num(loss, 4)} with the canaries; without them not measured"
    return f"{name} {fmt_num(loss, 4)} with the canaries, {fmt_num(base, 4)} without{same}: increase {fmt_num(up, 4)}"


def utility_text(audit: Mapping[str, Any]) -> str:
    """The canaries' cost in accuracy (uninformative near chance) and in test loss (every task), or why it was not
    measured."""
    u = audit.get("utility") or {}
    acc, base, drop = u.get("test_accuracy"), u.get("baseline_test_accuracy"), u.get("accuracy_drop")
    loss = loss_text(u)
    unrun = ("(`fedsim run`, or `fedsim audit --no-baseline`; `fedsim audit` runs the same scenario and seed without "
             "canaries)")
    if not isinstance(acc, int | float):
        if not isinstance(u.get("baseline_test_loss"), int | float):
            return f"{loss} {unrun}; the task has no accuracy"
        return f"{loss_text(u, ' (same scenario and seed)')}; the task has no accuracy"
    near = f" ({chance_note(u)})" if accuracy_near_chance(u) else ""
    if not isinstance(base, int | float):
        return f"test accuracy {fmt_num(acc)} with the canaries{near}; without them not measured {unrun}; {loss}"
    what = f"both {chance_note(u)}" if near else f"drop {fmt_num(drop)}"
    return (f"test accuracy {fmt_num(acc)} with the canaries, {fmt_num(base)} without (same scenario and seed): "
            f"{what}; {loss}")


def audit_line(audit: Mapping[str, Any]) -> str:
    """One console line for ``fedsim run``: the lower bound at its confidence vs the smallest accountant epsilon,
    and the verdict (``audit: lower bound 0.000 at 95% confidence (60 of 100 guesses correct) vs smallest
    accountant epsilon 8.078: consistent``)."""
    lb = audit.get("epsilon_lower_bound") or {}
    conf = audit.get("confidence")
    at = f"{conf:.0%}" if isinstance(conf, int | float) else "?"
    return (f"audit ({audit.get('level')} canaries): lower bound {fmt_num(lb.get('value'))} at {at} confidence "
            f"({lb.get('correct')} of {lb.get('guesses')} guesses correct) vs smallest accountant epsilon "
            f"{fmt_num(smallest_epsilon(audit))}: {audit.get('verdict')}")


def audit_items(audit: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, plain text) rows shared by summary.md and report.html."""
    return [
        ("mechanism", f"{mechanism_text(audit)}; {audit.get('canaries')} canaries, {audit.get('canaries_in')} "
                      f"included (each by a fair coin); each canary's norm once clipped, the accounted sensitivity C: "
                      f"{audit.get('canary_norm')}"),
        ("accountant epsilon", epsilon_text(audit)),
        ("empirical lower bound (a bound)", lower_bound_text(audit)),
        ("estimate (not a bound)", estimate_text(audit)),
        *([("two-variance estimate (not a bound, biased up)", estimate_text(audit, "epsilon_estimate_two_variance"))]
          if audit.get("epsilon_estimate_two_variance") else []),
        ("how to read", READING),
        ("verdict", verdict_text(audit)),
        ("observed", str(audit.get("observation") or "the released global models")),
        ("canaries' cost", utility_text(audit)),
    ]


def audit_markdown(audit: Mapping[str, Any] | None, image: str | None = None) -> list[str]:
    """The summary.md section (no lines without an audit block); ``image``: the histogram's file name."""
    if not isinstance(audit, Mapping):
        return []
    lines = [f"## {TITLE}", ""]
    lines += [f"- {label}: {text}" for label, text in audit_items(audit)]
    if image:
        lines += ["", f"![in vs out canary cosines]({image})"]
    return [*lines, ""]


def audit_histogram(audit: Mapping[str, Any] | None, path: Path) -> bool:
    """Histogram of the included vs left-out canaries' cosines (Andrew et al.'s statistic); False without scores."""
    scores = (audit or {}).get("scores") if isinstance(audit, Mapping) else None
    if not isinstance(scores, Mapping):
        return False
    ins = [float(v) for v in scores.get("in") or [] if isinstance(v, int | float)]
    outs = [float(v) for v in scores.get("out") or [] if isinstance(v, int | float)]
    if not ins and not outs:
        return False
    both = ins + outs
    lo, hi = min(both), max(both)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(outs, bins=bins, alpha=0.6, color="tab:blue", label=f"left out ({len(outs)})")
    ax.hist(ins, bins=bins, alpha=0.6, color="tab:red", label=f"included ({len(ins)})")
    ax.set_xlabel("cosine(canary, released model change)")
    ax.set_ylabel("canaries")
    ax.set_title("Canary scores: included vs left out")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def audit_section(metrics: Mapping[str, Any] | None, assets: Path) -> str:
    """The report.html section (empty string without an audit block); the histogram is drawn into ``assets``
    (the report's folder of PNGs) from the block's scores and embedded."""
    audit = audit_of(metrics)
    if audit is None:
        return ""
    from fedsim.report.gallery import data_uri

    target = Path(assets) / FIGURE_NAME
    uri = data_uri(target.read_bytes()) if audit_histogram(audit, target) else None
    bad = audit.get("verdict") == "violation"
    rows = [(label, f'<span class="bad">{esc(text)}</span>' if bad and label == "verdict" else esc(text))
            for label, text in audit_items(audit)]
    intro = ("Canaries with random in/out coins were inserted into this same run, and the released models scored "
             "against them. A lower bound above the accountant's epsilon would prove a bug; far below it is the "
             "honest gap between the worst case the accountant covers and this run. The estimates are not bounds. "
             "The audit checks the noise against the accounted sensitivity and catches only large shortfalls "
             "(docs/auditing.md, 'What the audit can catch').")
    caption = ("Cosine between each canary's direction and the released model's change: included canaries (red) "
               "against left-out ones (blue). The further apart, the more the run reveals which canaries it held.")
    return (f'<section id="audit"><h2>{esc(TITLE)}</h2><p class="note">{esc(intro)}</p>{facts(rows)}'
            f"{figure(uri, caption if uri else 'No canary scores to draw.', 'in vs out canary cosines')}</section>")
