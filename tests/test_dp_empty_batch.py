"""An empty Poisson batch is one noise-only DP step in every grad-sample mode and every Opacus DP defense.

Poisson sampling draws an empty batch with probability (1 - q)^n (e^-4 per client-round at an expected batch
of 4). Opacus's per-sample machinery cannot run on 0 rows in every mode (ghost clipping's embedding norm sampler
raised "cannot reshape tensor of 0 elements" on gpt/bert, a client failure), so ``fedsim.defenses.dp_sgd`` routes an
empty batch around it. Here the sampler is forced to draw nothing and the sent update must be exactly what the
accountant assumes: N(0, (sigma C)^2) per coordinate divided by the expected batch size (closed form), and
exactly 0 at sigma 0 (no gradient of any example leaks in).
"""

from __future__ import annotations

import math

import pytest
import text_support  # noqa: F401  (registers tiny-text)
import torch
from conftest import TINY

from fedsim.defenses import dp_sgd
from fedsim.scenario import parse_scenario
from fedsim.simulation import run_federation

MODES = ["hooks", "functorch", "ew", "ghost", "bk"]
BS, C = 4, 0.5
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook")]


def _raw(kind: str, defense: str, mode: str, sigma: float, protocol: str) -> dict:
    params: dict = {"noise_multiplier": sigma, "max_grad_norm": C, "grad_sample_mode": mode}
    if defense == "dp_sat":
        params["persist"] = True  # fedsgd DP-SAT needs it (else it is dp_sgd)
    if kind == "gpt":
        data, model, attack = {"dataset": "tiny-text", "partition": {"kind": "iid"}}, \
            {"name": "gpt", "width": 16, "depth": 1}, {"name": "token_set"}
    else:
        data, model = dict(TINY["data"]), {"name": "mlp", "width": 32}
        attack = {"name": "inverting_gradients", "budget": {"iterations": 1}}
    local = {"batch_size": BS, "lr": 0.5} if protocol == "fedsgd" else {"batch_size": BS, "lr": 0.5, "steps": 2}
    return {"name": "empty", "seed": 3, "device": "cpu", "data": data, "model": model,
            "federation": {"clients": 2, "rounds": 1, "protocol": protocol, "local": local},
            "backend": {"kind": "inprocess"}, "defenses": [{"name": defense, "params": params}],
            "attacks": [{**attack, "rounds": [1], "clients": "all"}]}


def _empty_updates(monkeypatch, raw: dict) -> list[torch.Tensor]:
    monkeypatch.setattr(dp_sgd, "poisson_batches",
                        lambda n, q, steps, gen: [torch.zeros(0, dtype=torch.long) for _ in range(steps)])
    outcome = run_federation(parse_scenario(raw))
    got = {u.partition_id: u for u in outcome.capture.updates}
    assert sorted(got) == [0, 1], "a client failed on its empty batch"
    for pid in (0, 1):
        assert len(got[pid].truth.inputs) == 0
        metrics = outcome.capture.client_metrics[1][pid]
        assert metrics["steps"] == raw["federation"]["local"].get("steps", 1)  # every empty step is accounted
        assert math.isfinite(metrics["epsilon"]) or raw["defenses"][0]["params"]["noise_multiplier"] == 0
    return [torch.cat([v.flatten().double() for v in got[pid].update.values()]) for pid in (0, 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["gpt", "image"])
@pytest.mark.parametrize("defense", ["dp_sgd", "dp_sat", "dp_sam"])
def test_an_empty_batch_sends_exactly_the_accounted_noise(monkeypatch, defense: str, kind: str, mode: str) -> None:
    sigma = 2.0
    for noise in _empty_updates(monkeypatch, _raw(kind, defense, mode, sigma, "fedsgd")):
        want = sigma * C / BS  # Opacus divides the noised sum by the expected batch size (loss_reduction mean)
        assert torch.isfinite(noise).all()
        assert noise.std().item() == pytest.approx(want, rel=0.08)
        assert abs(noise.mean().item()) < 5 * want / math.sqrt(noise.numel())
        kurtosis = (((noise - noise.mean()) / noise.std()) ** 4).mean().item()
        assert kurtosis == pytest.approx(3.0, abs=0.5)  # Gaussian


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["gpt", "image"])
@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_an_empty_batch_without_noise_sends_exactly_zero(monkeypatch, protocol: str, kind: str, mode: str) -> None:
    """sigma 0 (clipping only): nothing was sampled, so nothing may move (fedavg: 2 empty steps, no weight change)."""
    for update in _empty_updates(monkeypatch, _raw(kind, "dp_sgd", mode, 0.0, protocol)):
        assert torch.equal(update, torch.zeros_like(update))


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_fedavg_step_moves_the_weights_by_the_scaled_noise(monkeypatch, mode: str) -> None:
    """fedavg, plain SGD, 2 empty steps: local - global = -lr (n_1 + n_2), std lr sqrt(2) sigma C / BS."""
    sigma = 2.0
    for delta in _empty_updates(monkeypatch, _raw("gpt", "dp_sgd", mode, sigma, "fedavg")):
        assert delta.std().item() == pytest.approx(0.5 * math.sqrt(2) * sigma * C / BS, rel=0.08)
