"""``fedsim run``: federation -> captured updates -> attacks -> scores -> run directory."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedsim.attack_checks import check_attack_preconditions
from fedsim.attack_tasks import executor_for
from fedsim.attacking import AttackOutcome, ProgressFactory, run_attacks
from fedsim.audit.baseline import with_baseline
from fedsim.audit.scoring import audit_block
from fedsim.privacy.summary import privacy_summary
from fedsim.report.writer import check_run_dir, write_run_dir
from fedsim.scenario import Scenario
from fedsim.simulation import run_federation
from fedsim.simulation.server_app import RoundCallback
from fedsim.simulation.setup import setup_for


@dataclass
class RunResult:
    out_dir: Path | None
    history: list[dict[str, float]]
    outcomes: list[AttackOutcome]
    timing: dict[str, float]
    client_metrics: dict[int, dict[int, dict[str, float]]]
    client_failures: list[dict[str, Any]] = field(default_factory=list)  # {round, client, reason} per failed client
    privacy: dict[str, Any] = field(default_factory=dict)  # fedsim.privacy.summary.privacy_summary (metrics.json)
    audit: dict[str, Any] = field(default_factory=dict)  # fedsim.audit.scoring.audit_block; empty without audit:


def default_out_dir(scenario: Scenario) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(scenario.output.dir) / f"{scenario.name}-{stamp}"


def run_scenario(
    scenario: Scenario,
    out_dir: Path | None = None,
    *,
    write: bool = True,
    verbose: bool = False,
    on_round: RoundCallback | None = None,
    attack_progress: ProgressFactory | None = None,
    backend: str | None = None,
    overwrite: bool = False,
    audit_baseline: Mapping[str, float | None] | None = None,
) -> RunResult:
    """Run a validated scenario end to end; write the run directory unless ``write`` is False.

    ``overwrite`` lets an earlier fedsim run directory at ``out_dir`` be replaced; any other existing,
    non-empty ``out_dir`` is refused (:class:`~fedsim.errors.FedsimError`) before anything runs.
    ``audit_baseline``: the test accuracy and loss of the same scenario without canaries (``fedsim audit``,
    :func:`fedsim.audit.baseline.baseline_utility`), put in the
    ``audit`` block (:func:`fedsim.audit.baseline.with_baseline`) before anything is written.
    """
    if scenario.federation.protocol == "zeroth_order":  # black-box task, no model: its own runner (fedsim.zo.run)
        from fedsim.zo.run import run_zo_scenario

        return run_zo_scenario(scenario, out_dir, write=write, verbose=verbose, on_round=on_round, backend=backend,
                               overwrite=overwrite)
    start = time.perf_counter()
    target = (out_dir or default_out_dir(scenario)) if write else None
    if target is not None:
        check_run_dir(target, overwrite)  # refuse now, not after minutes of federation and attacks
    setup = setup_for(scenario)
    setup.data  # noqa: B018 - load (and fail on missing data) before any Ray start-up cost
    check_attack_preconditions(scenario)  # validation skips it when the data was not yet on disk
    outcome = run_federation(scenario, on_round=on_round, verbose=verbose, backend=backend)
    federation_s = time.perf_counter() - start
    descriptions: list[dict[str, Any]] = [dict(d.public_description()) for d in setup.defenses]
    failures = [f.to_json() for f in outcome.capture.participation.failures]
    outcomes = run_attacks(scenario, outcome.capture.updates, setup.task, setup.device, descriptions,
                           attack_progress, released=outcome.released,
                           failed_clients={(f["round"], f["client"]): f["reason"] for f in failures},
                           executor=executor_for(scenario, backend, verbose))  # attack_execution: serial or ray
    timing = {
        "federation_s": round(federation_s, 3),
        "attacks_s": round(time.perf_counter() - start - federation_s, 3),
        "total_s": round(time.perf_counter() - start, 3),
    }
    if outcome.capture.first_train_sent is not None:  # start-up: run_scenario's entry -> round 1's training sent
        timing["startup_s"] = round(outcome.capture.first_train_sent - start, 3)
    privacy = privacy_summary(outcome.history, outcome.capture.client_metrics)
    audit = {} if scenario.audit is None else audit_block(scenario, setup.build_model().state_dict(),
                                                          outcome.final_state, outcome.history, privacy)
    if audit and audit_baseline is not None:
        audit = with_baseline(audit, audit_baseline)
    pretrained = {}
    if scenario.model.pretrain is not None:  # text: the run started from a publicly pretrained model
        from fedsim.text.pretrain import pretrain_record

        pretrained = pretrain_record(scenario, setup.build_model())
    written = None
    if write:
        clients = {str(r): {str(p): m for p, m in per.items()} for r, per in outcome.capture.client_metrics.items()}
        written = write_run_dir(target, scenario, outcome.history, outcomes, timing,
                                extra={"client_failures": failures, **({"client_metrics": clients} if clients else {}),
                                       **({"privacy": privacy} if privacy else {}),
                                       **({"audit": audit} if audit else {}),
                                       **({"pretrain": pretrained} if pretrained else {})},
                                overwrite=overwrite)
    return RunResult(written, outcome.history, outcomes, timing, outcome.capture.client_metrics, failures,
                     privacy=privacy, audit=audit)
