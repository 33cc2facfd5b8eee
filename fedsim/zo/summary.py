"""What a zeroth-order run's summary.md and report.html header say about the run (the task, the method, the
message defenses), instead of the neural-network protocols' data / model / local-training lines, which do not
apply (:mod:`fedsim.zo.validate` refuses those blocks under ``federation.protocol: zeroth_order``). The objective,
query and attack lines come from :mod:`fedsim.zo.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.report.page import esc
from fedsim.zo.report import RunInfo, defense_label, zo_markdown


def failure_text(failure: Mapping[str, Any]) -> str:
    """One client failure that stopped a zeroth-order run, as summary.md and report.html show it."""
    rnd = failure.get("round")
    kept = f"rounds 0-{int(rnd) - 1} are kept" if isinstance(rnd, int) and rnd > 0 else "no round is kept"
    who = f"client {failure.get('client')} failed" if failure.get("client", -1) != -1 else "it failed"
    return f"the run stopped in round {rnd}: {who} ({failure.get('reason')}); {kept}"


def _task_text(zo: Mapping[str, Any]) -> str:
    task = zo.get("task") or {}
    size = f", d = {task['dim']}" if task.get("dim") else ""
    data = f", data {task['dataset']}" if task.get("dataset") else ""
    return f"{task.get('family')}{size}{data}"


def _method_text(zo: Mapping[str, Any]) -> str:
    return (f"{zo.get('method')}: {zo.get('local_iters')} local steps (lr {zo.get('lr')}), global lr "
            f"{zo.get('global_lr')}, safeguard {zo.get('safeguard')}")


def zo_facts(scn: Mapping[str, Any]) -> list[tuple[str, str]]:
    """report.html header facts of a resolved zeroth-order scenario.yaml: task, method, federation, backend and the
    message defenses (HTML-escaped values)."""
    zo, fed = scn.get("zeroth_order") or {}, scn.get("federation") or {}
    return [
        ("task", esc(_task_text(zo))),
        ("method", esc(_method_text(zo))),
        ("federation", esc(f"{fed.get('clients')} clients, every client every round, {fed.get('rounds')} round(s), "
                           "zeroth_order (clients query values of their private f_i only)")),
        ("backend", esc((scn.get("backend") or {}).get("kind"))),
        ("defenses", esc(defense_label(zo.get("defenses")))),
    ]


def zo_summary_markdown(scenario: Any, history: Sequence[Mapping[str, Any]], timing: Mapping[str, float],
                        failures: Sequence[Mapping[str, Any]] | None = None) -> str:
    """summary.md of a zeroth-order run: what ran, the client failure that stopped it (``failures``: {round, client,
    reason}), then :func:`fedsim.zo.report.zo_markdown` (threat model, objective and queries, attacks or why none
    ran, caveats such as the SecAgg simulation)."""
    zo = scenario.zeroth_order.model_dump(mode="json")
    fed = scenario.federation
    lines = [f"# {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description.strip(), ""]
    lines += [
        f"- task: {_task_text(zo)}; method {_method_text(zo)}",
        f"- federation: {fed.clients} clients, every client every round, {fed.rounds} rounds, protocol "
        f"`zeroth_order`, backend `{scenario.backend.kind}`",
        f"- message defenses: {defense_label(zo.get('defenses'))}; seed {scenario.seed}",
        f"- time: federation {timing.get('federation_s', 0):.1f} s, attacks {timing.get('attacks_s', 0):.1f} s",
        "",
    ]
    lines += [f"**Error: {failure_text(f)}**\n" for f in failures or []]
    body = zo_markdown(history, RunInfo.from_scenario(scenario.model_dump(mode="json")))
    return "\n".join(lines + (body or ["No round finished."])) + "\n"
