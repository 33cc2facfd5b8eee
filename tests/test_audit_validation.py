"""``audit:`` validation (fedsim.audit.checks): each federation the canaries cannot run in correctly is refused with
one line at its YAML path (exit 2 at the CLI); what is accepted runs (tests/test_audit_injection.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

BASE: dict[str, Any] = {
    "name": "audit-checks", "seed": 1, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 80, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 1},
    "federation": {"clients": 4, "rounds": 2, "protocol": "fedavg", "local": {"batch_size": 10, "lr": 0.5}},
    "backend": {"kind": "inprocess"}, "attacks": [], "audit": {"canaries": 20},
}
DPSGD = {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}
CDP = {"name": "central_dp", "params": {"noise_multiplier": 1.0, "clipping_norm": 0.5}}
ZO = {"name": "zo", "seed": 0, "federation": {"protocol": "zeroth_order", "clients": 2, "rounds": 2},
      "backend": {"kind": "inprocess"}, "audit": {"canaries": 20},
      "zeroth_order": {"task": {"family": "quadratic", "dim": 3}, "method": "fzoos", "local_iters": 2}}


def raw_with(defenses: list[dict] | None = None, audit: dict | None = None, **federation: Any) -> dict:
    raw = copy.deepcopy(BASE)
    raw["defenses"] = defenses or []
    raw["audit"].update(audit or {})
    raw["federation"].update(federation)
    return raw


REFUSED = [  # (scenario, the path, words of the reason)
    (ZO, "audit", "loss values"),
    (raw_with(staleness={"tau": 1, "slow_clients": [1]}), "federation.staleness", "rebased"),
    ({**raw_with(), "server": {"role": "malicious"}}, "server.role", "malicious server"),
    (raw_with(audit={"level": "example"}), "audit.level", "sample-level DP defense"),
    (raw_with([DPSGD], audit={"level": "client"}), "audit.level", "dp_sgd: its accountant bounds one example"),
    (raw_with([{"name": "diff2", "params": {"restart_period": 1, "sigma1": 0.0}}], audit={"level": "client"},
              protocol="fedsgd"), "audit.level", "diff2"),
    (raw_with([DPSGD], audit={"client_norm": 0.5}), "audit.client_norm", "client canaries only"),
]


@pytest.mark.parametrize(("raw", "path", "words"), REFUSED, ids=[f"{p}:{w[:12]}" for _, p, w in REFUSED])
def test_audits_the_canaries_cannot_run_in_are_refused_at_their_path(raw, path, words) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(copy.deepcopy(raw))
    assert info.value.path == path and words in info.value.reason, str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("defenses", "audit", "level"), [
    ([DPSGD], {}, "example"), ([CDP], {}, "client"), ([], {"client_norm": 0.3}, "client"),
    ([CDP], {"client_norm": 0.3}, "client"),  # the canaries' norm before central DP clips them
    ([DPSGD], {"level": "example"}, "example")])
def test_audits_the_canaries_can_run_in_are_accepted(defenses, audit, level) -> None:
    from fedsim.audit.canaries import audit_level

    assert audit_level(parse_scenario(raw_with(defenses, audit))) == level


def test_validate_exits_2_with_one_line_for_a_refused_audit(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw_with([DPSGD], audit={"level": "client"})))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "audit.level" in lines[0], result.output
