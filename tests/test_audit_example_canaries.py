"""Example canaries go through the mechanism's OWN per-example clipping (issue 15, QA review finding 1).

An example canary's per-example gradient has norm 10 C (``EXAMPLE_NORM_FACTOR``), above the clipping norm C the
accountant assumes; it joins the real records' per-example gradients before the clip (Opacus's ``p.grad_sample``
under hooks, functorch and ew; DIFF2's restart-round per-example gradients before ``clip_C1``). So:

* closed form, noise 0: the released model moves by the canary rows AS THE MECHANISM CLIPPED THEM. The expected
  move is recomputed here by brute force (seeded draws, directions, each row clipped by hand): C per canary when
  the clip works, the optimizer's own norm when it clips to another norm than the accountant's C, 10 C when it
  does not clip at all. Before this change the canaries were added after the clipping, at exactly C, whatever the
  clip did: the "clips to 2 C" and "does not clip" cases fail on that code;
* mutation: an optimizer (or DIFF2 client) whose clipping does not clip while the noise and the accountant keep
  C makes the audit say ``violation`` (on the old injection it said ``consistent``), as does noise cut to 1 %;
  honest runs stay ``consistent`` over 3 seeds;
* ghost clipping has no per-example gradients: its canaries still join after the clipping, at C, and the audit
  block says so (``canaries_clipped_by_mechanism: false``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_audit_injection import LR, N_P, SEED, M, P, check, coins, moved, raw_with
from test_audit_soundness import (
    SEEDS,
    audit_of,
    check_the_bound_is_corrected,
    scenario_raw,
    shrink_diff2_noise,
    shrink_opacus_noise,
    smallest,
)

from fedsim.audit.canaries import CanarySet
from fedsim.audit.inject import canaries_clipped_by_mechanism
from fedsim.scenario import parse_scenario
from fedsim.seeding import numpy_rng

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

C = 0.7
FACTOR = 10.0  # the canaries' per-example gradient norm, in units of C (fedsim.audit.canaries.EXAMPLE_NORM_FACTOR)
NO_CLIP = 1e9  # a "clipping norm" no gradient reaches: the clip does nothing


def clip_by_hand(row: torch.Tensor, radius: float) -> torch.Tensor:
    """``row * min(1, radius / ||row||)``: one example's clip, written out here."""
    return row * min(1.0, radius / float(row.norm()))


def opacus_clips_to(monkeypatch, radius: float) -> None:
    """The Opacus optimizer clips the per-example gradients to ``radius`` while its noise (sigma x max_grad_norm)
    and the accountant keep the configured C: a clipping bug (``NO_CLIP``: the clip does nothing)."""
    from opacus.optimizers.optimizer import DPOptimizer

    real = DPOptimizer.clip_and_accumulate

    def clip_to(self) -> None:  # noqa: ANN001
        configured, self.max_grad_norm = self.max_grad_norm, radius
        try:
            real(self)
        finally:
            self.max_grad_norm = configured

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_to)


def diff2_clips_to(monkeypatch, radius: float) -> None:
    """DIFF2's client clips its per-example gradients to ``radius`` instead of C1 (noise and accountant keep C1)."""
    import fedsim.defenses.diff2_client as client

    real = client.clip_per_example
    monkeypatch.setattr(client, "clip_per_example", lambda grads, _r: real(grads, radius))


# -- closed form: the released model moves by the CLIPPED canary rows -----------------------------------------------
def drawn_rows_clipped(canaries: CanarySet, q: float, radius: float) -> torch.Tensor:
    """mean over clients of the sum of each included canary's row ``10 C c_j`` drawn into batch 0 of round 1,
    each clipped by hand to ``radius``."""
    inside = coins()
    total = torch.zeros(canaries.dim)
    for pid in range(P):
        mine = list(range(pid, M, P))  # canary j belongs to client j mod P
        drawn = numpy_rng(SEED, "audit", "sample", 1, pid, 0).random(len(mine)) < q
        for j, d in zip(mine, drawn, strict=True):
            if d and inside[j]:
                total += clip_by_hand(FACTOR * C * canaries.direction(j), radius)
    return total / P


MODES = [("hooks", "fedsgd", {}), ("functorch", "fedsgd", {}), ("ew", "fedavg", {"steps": 1})]


@pytest.mark.parametrize("radius", [C, 2 * C, NO_CLIP], ids=["clips-to-C", "clips-to-2C", "no-clip"])
@pytest.mark.parametrize(("mode", "protocol", "local"), MODES, ids=[m[0] for m in MODES])
def test_dp_sgd_canaries_move_the_model_by_what_the_optimizer_clipped_them_to(monkeypatch, mode, protocol, local,
                                                                              radius) -> None:
    """One step, batch 10 of 20 (q = 1/2), sigma 0: each canary row (norm 10 C) moves the model by
    -lr min(radius, 10 C) c_j / 10 / P, radius being the norm the optimizer REALLY clips to: C when it works."""
    opacus_clips_to(monkeypatch, radius)
    raw = raw_with([{"name": "dp_sgd", "params": {"noise_multiplier": 0.0, "max_grad_norm": C,
                                                   "grad_sample_mode": mode}}], protocol, **local)
    change, canaries = moved(raw, {"level": "example"})
    check(change, -LR * drawn_rows_clipped(canaries, 0.5, radius) / 10)


@pytest.mark.parametrize("radius", [0.8, 1.6, NO_CLIP], ids=["clips-to-C1", "clips-to-2C1", "no-clip"])
def test_diff2_canaries_move_the_model_by_what_its_clip_made_of_them(monkeypatch, radius) -> None:
    """A restart round (T = 1), sigma1 0, C1 = 0.8: every canary of client p is a record with gradient
    s_j 10 C1 c_j, clipped with the real records, so a_p gains s_j min(radius, 10 C1) c_j / n_p."""
    diff2_clips_to(monkeypatch, radius)
    raw = raw_with([{"name": "diff2", "params": {"restart_period": 1, "sigma1": 0.0, "c1": 0.8}}])
    change, canaries = moved(raw, {})
    inside = coins()
    expected = torch.zeros(canaries.dim)
    for j in range(M):
        row = (1.0 if inside[j] else -1.0) * FACTOR * 0.8 * canaries.direction(j)
        expected += clip_by_hand(row, radius) / N_P
    check(change, -LR * expected / P)


def test_ghost_clipping_canaries_join_after_the_clip_and_the_block_says_so() -> None:
    """Ghost clipping forms no per-example gradients: the canaries add C c_j after its clip (which they therefore
    do not exercise), and ``canaries_clipped_by_mechanism`` is false for it, true for the other modes and DIFF2."""
    raw = raw_with([{"name": "dp_sgd", "params": {"noise_multiplier": 0.0, "max_grad_norm": C,
                                                   "grad_sample_mode": "ghost"}}])
    change, canaries = moved(raw, {"level": "example"})
    check(change, -LR * drawn_rows_clipped(canaries, 0.5, C) / 10)  # C each: the clip is bypassed

    def clipped(defense: dict) -> bool | None:
        return canaries_clipped_by_mechanism(parse_scenario({**raw_with([defense]), "audit": {"canaries": M}}))

    dp = {"name": "dp_sgd", "params": {"noise_multiplier": 1.0}}
    for mode in ("ghost", "bk"):  # bk (book-keeping clipping) forms no per-example gradients either
        assert clipped({**dp, "params": {**dp["params"], "grad_sample_mode": mode}}) is False
    for mode in ("hooks", "functorch", "ew", "auto"):  # auto takes hooks under an example-level audit
        assert clipped({**dp, "params": {**dp["params"], "grad_sample_mode": mode}}) is True
    assert clipped({"name": "diff2", "params": {"restart_period": 1, "sigma1": 0.5, "c1": 0.8}}) is True
    no_dp = parse_scenario({**raw_with([]), "audit": {"canaries": M}})
    assert canaries_clipped_by_mechanism(no_dp) is None  # client canaries: not this question


# -- the audit: a clip that does not clip is a violation ---------------------------------------------------------
#: soundness scenarios of tests/test_audit_soundness.py (C = 10, 500 canaries), one per clipping implementation
CLIPPED_PATHS = {"dp_sgd-hooks": opacus_clips_to, "dp_sgd-poisson-fedavg": opacus_clips_to,
                 "dp_sam": opacus_clips_to, "diff2-central": diff2_clips_to}


def functorch(raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    raw["defenses"][0]["params"]["grad_sample_mode"] = "functorch"
    return raw


@pytest.mark.parametrize("path", list(CLIPPED_PATHS))
def test_clipping_that_does_not_clip_is_a_violation(monkeypatch, path) -> None:
    """The clip does nothing while the noise and the accountants keep C: the canaries (10 C each) are released
    with a tenth of the noise they are accounted for, and the audit proves it."""
    honest = audit_of(scenario_raw(path, SEEDS[0]))
    CLIPPED_PATHS[path](monkeypatch, NO_CLIP)
    broken = audit_of(scenario_raw(path, SEEDS[0]), cache=False)
    assert broken["epsilon"] == honest["epsilon"]  # the accountants still report the configured C
    assert broken["epsilon_lower_bound"]["value"] > smallest(broken), (broken["epsilon_lower_bound"], honest)
    assert broken["verdict"] == "violation"
    check_the_bound_is_corrected(broken["epsilon_lower_bound"])


def test_functorch_clipping_that_does_not_clip_is_a_violation(monkeypatch) -> None:
    opacus_clips_to(monkeypatch, NO_CLIP)
    broken = audit_of(functorch(scenario_raw("dp_sgd-hooks", SEEDS[0])), cache=False)
    assert broken["verdict"] == "violation", broken["epsilon_lower_bound"]


@pytest.mark.parametrize(("path", "shrink"), [("dp_sgd-hooks", shrink_opacus_noise),
                                              ("diff2-central", shrink_diff2_noise)])
def test_noise_cut_to_one_percent_is_a_violation(monkeypatch, path, shrink) -> None:
    shrink(monkeypatch)
    assert audit_of(scenario_raw(path, SEEDS[0]), cache=False)["verdict"] == "violation"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("path", ["dp_sgd-hooks", "diff2-central"])
def test_honest_runs_with_canaries_through_the_clip_are_consistent(path, seed) -> None:
    audit = audit_of(scenario_raw(path, seed))
    assert audit["epsilon_lower_bound"]["value"] <= smallest(audit), audit["epsilon_lower_bound"]
    assert audit["verdict"] == "consistent"
    assert audit["canaries_clipped_by_mechanism"] is True
