"""A DP mechanism whose noise is calibrated to a sensitivity bound on the client's message refuses an update transform
placed between that bound and the noise unless the transform preserves the bound (``Defense.sensitivity_preserving``:
non-expansive, or data-independent noise).

DIFF2 is the one such mechanism with a window: its per-example clip bounds the uniform mean's sensitivity by
2 C / (n_min P), and every update transform (stage 50) runs before its noise (stage 60 on the client under
local/distributed, the server under central). central_dp clips after every client transform (Flower's client mod
wraps the train function; server-side clipping runs on the server) and dp_sgd / dp_sat / dp_sam noise inside the
optimizer (transforms after it are post-processing), so they have no window. The brute-force check below shows
why pruning and quantization are refused: on neighbouring datasets they move the messages far beyond the bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diff2_support import scenario_raw

from fedsim.defenses.base import DEFENSES, Defense, UpdateContext
from fedsim.defenses.clipping import clip_update
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario

DIFF2 = {"restart_period": 2, "c1": 1.0, "c2": 2.0, "target_epsilon": 8.0}
UNSAFE = [{"name": "pruning", "params": {"percent": 75}}, {"name": "quantization", "params": {"bits": 2}},
          {"name": "quantization", "params": {"bits": 2, "stochastic": True}}]
SAFE = [{"name": "clipping", "params": {"max_norm": 0.5}}, {"name": "gaussian_noise", "params": {"sigma": 0.01}},
        {"name": "laplace_noise", "params": {"scale": 0.01}}]
PLACEMENTS = ["central", "local", "distributed"]


def _raw(placement: str, other: dict, other_first: bool = False) -> dict:
    raw = scenario_raw({**DIFF2, "noise_placement": placement}, secure=placement == "distributed")
    diff2, *rest = raw["defenses"]
    raw["defenses"] = [other, diff2, *rest] if other_first else [diff2, other, *rest]
    return raw


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("other", UNSAFE, ids=lambda o: f"{o['name']}-{o['params']}")
@pytest.mark.parametrize("other_first", [False, True])
def test_diff2_refuses_an_expansive_transform_before_its_noise(placement: str, other: dict, other_first: bool) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(_raw(placement, other, other_first))
    diff2_at, other_at = (1, 0) if other_first else (0, 1)
    assert err.value.path == f"defenses[{diff2_at}]"
    assert f"defenses[{other_at}] ({other['name']})" in err.value.reason and "\n" not in str(err.value)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("other", SAFE, ids=lambda o: o["name"])
def test_diff2_accepts_clipping_and_data_independent_noise(placement: str, other: dict) -> None:
    parse_scenario(_raw(placement, other))
    parse_scenario(_raw(placement, other, other_first=True))


def test_no_ordering_puts_a_client_transform_after_diff2s_noise() -> None:
    """Pruning after the noise would be post-processing, but no defense transforms the update at a stage above
    diff2's (60): every transform runs before its noise (and central noise is added on the server)."""
    after = [name for name in DEFENSES if DEFENSES.get(name).transform_update is not Defense.transform_update
             and DEFENSES.get(name).stage > DEFENSES.get("diff2").stage]
    assert after == []


# -- brute force: the sensitivity of a clipped mean before and after each transform -------------------------------
C, N = 1.0, 8  # per-example clip, examples per client: one record moves the mean by at most 2 C / N
SHAPES = {"w": (3, 4), "b": (4,)}


def _split(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k, shape in SHAPES.items():
        size = int(torch.tensor(shape).prod())
        out[k] = flat[start:start + size].reshape(shape).clone()
        start += size
    return out


def _clipped_mean(grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    clipped = [g * min(1.0, C / float(g.norm())) for g in grads]
    return _split(torch.stack(clipped).mean(0))


def _neighbours() -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Messages of neighbouring datasets (one example's gradient replaced): random gradients, and gradients whose
    entries sit near a tie of the magnitude order or near a rounding threshold (where pruning / quantization jump)."""
    gen = torch.Generator().manual_seed(0)
    d = sum(int(torch.tensor(s).prod()) for s in SHAPES.values())
    pairs = []
    for _ in range(100):
        grads = [torch.randn(d, generator=gen) * 2 for _ in range(N)]
        other = torch.randn(d, generator=gen) * 2
        pairs.append((_clipped_mean(grads), _clipped_mean([other, *grads[1:]])))
    for base in (1.0, 0.5):  # near ties (every entry ~1) / near the 2-bit threshold (half the max entry)
        for eps in (1e-3, 1e-2):
            sign = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
            near = torch.full((d,), base) + eps * sign
            near[0] = 1.0
            flipped = torch.full((d,), base) - 2 * N * eps * sign
            flipped[0] = 1.0
            pairs.append((_clipped_mean([near] * N), _clipped_mean([flipped] + [near] * (N - 1))))
    return pairs


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a)))


def _worst_ratio(name: str, params: dict, seeds: int = 3) -> float:
    """max over neighbouring pairs (and ``seeds`` draws of the transform's randomness, the same on both messages)
    of ||T(m) - T(m')|| / (2 C / N)."""
    defense = DEFENSES.get(name)(DEFENSES.get(name).Params.model_validate(params), name)
    worst = 0.0
    for seed in range(seeds):
        ctx = UpdateContext(seed=seed, round=1, partition_id=0, protocol="fedsgd", num_examples=N)
        for a, b in _neighbours():
            assert _distance(a, b) <= 2 * C / N + 1e-9  # the bound itself holds before the transform
            ta = defense.transform_update(copy.deepcopy(a), ctx)[0]
            tb = defense.transform_update(copy.deepcopy(b), ctx)[0]
            worst = max(worst, _distance(ta, tb) / (2 * C / N))
    return worst


@pytest.mark.parametrize("other", UNSAFE, ids=lambda o: f"{o['name']}-{o['params']}")
def test_pruning_and_quantization_break_the_sensitivity_bound(other: dict) -> None:
    assert not DEFENSES.get(other["name"]).sensitivity_preserving
    assert _worst_ratio(other["name"], other["params"]) > 1.5


def test_every_transform_declared_sensitivity_preserving_keeps_the_bound() -> None:
    declared = [name for name in DEFENSES if DEFENSES.get(name).sensitivity_preserving
                and DEFENSES.get(name).transform_update is not Defense.transform_update and name != "diff2"]
    assert {"clipping", "gaussian_noise", "laplace_noise"} <= set(declared)
    for name in declared:
        assert _worst_ratio(name, {}) <= 1 + 1e-6, name
    # clipping to a radius below the messages' norms still contracts (a projection onto a ball)
    assert _worst_ratio("clipping", {"max_norm": 0.05}) <= 1 + 1e-6
    a, b = _neighbours()[0]
    assert _distance(clip_update(a, 0.05), clip_update(b, 0.05)) <= _distance(a, b) + 1e-9
