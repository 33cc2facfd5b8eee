"""Client-side data augmentation (``federation.local.augmentation: flip_crop``, fedsim/augment.py).

Kinds guarded here, each against an independent computation (a brute-force search over every crop window and
flip, a hand-written gradient on the hand-augmented batch), never the call under test:

* every augmented example is a window of the zero-padded (mirrored, where allowed) original; digits and MNIST are
  never mirrored, CIFAR is (about half the time);
* the draws are seeded by (seed, round, partition id, step): identical across calls and whatever the global RNG
  holds (what makes the two backends agree), different across steps;
* the client's update is computed on the augmented batch (fedsgd: the one batch; fedavg: every step), under DP-SGD
  too, while the evaluator's truth stays the un-augmented images;
* it is refused at ``federation.local.augmentation`` on feature vectors and on zeroth-order clients, by
  ``fedsim validate`` with one line and exit 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedsim.augment import MIRROR_INVARIANT, Augmentation, augmentation_for
from fedsim.data import normalize
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario, set_dotted
from fedsim.simulation.client_round import run_client_round
from fedsim.simulation.setup import setup_for

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the")]

BASE: dict[str, Any] = {
    "name": "aug", "seed": 5, "device": "cpu",
    "data": {"dataset": "digits", "train_subset": 32, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "width": 2},
    "federation": {"clients": 4, "rounds": 1, "protocol": "fedsgd",
                   "local": {"batch_size": 8, "lr": 0.1, "augmentation": "flip_crop"}},
    "backend": {"kind": "inprocess"},
}


def raw(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    for key, value in changes.items():
        set_dotted(out, key, copy.deepcopy(value))
    return out


def _window_of(out: torch.Tensor, src: torch.Tensor, pad: int, flips: bool) -> tuple[bool, bool]:
    """Brute force: is ``out`` (C, H, W) some window of zero-padded ``src`` (or of its mirror)? -> (found, mirrored)."""
    h, w = src.shape[-2:]
    for mirrored in ((False, True) if flips else (False,)):
        img = src.flip(-1) if mirrored else src
        padded = torch.zeros(src.shape[0], h + 2 * pad, w + 2 * pad)
        padded[:, pad:pad + h, pad:pad + w] = img
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if torch.equal(padded[:, dy:dy + h, dx:dx + w], out):
                    return True, mirrored
    return False, False


def _asymmetric_images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images whose left-right mirror and shifted windows are all distinct (no accidental match)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=gen) * 0.9 + 0.05


@pytest.mark.parametrize(("dataset", "shape", "pad", "mirror"), [
    ("digits", (1, 8, 8), 1, False), ("mnist-5k", (1, 28, 28), 3, False), ("cifar10-mini", (3, 32, 32), 4, True)])
def test_every_example_is_a_window_of_the_padded_original(dataset: str, shape: tuple[int, ...], pad: int,
                                                           mirror: bool) -> None:
    aug = augmentation_for("flip_crop", dataset, shape)
    assert aug == Augmentation(flip=mirror, pad=pad) and (dataset in MIRROR_INVARIANT) == mirror
    x = _asymmetric_images(40, shape[0], shape[1])
    out = aug.apply(x, seed=1, round_num=2, partition_id=3, step=4)
    assert out.shape == x.shape
    found = [_window_of(o, s, pad, flips=True) for o, s in zip(out, x, strict=True)]
    assert all(f for f, _ in found)
    mirrored = sum(m for _, m in found)
    if mirror:
        assert 8 <= mirrored <= 32  # Binomial(40, 1/2): outside this range with probability < 1e-4
    else:
        assert mirrored == 0  # a mirrored digit is no digit: never flipped
    moved = sum(not torch.equal(o, s) for o, s in zip(out, x, strict=True))
    assert moved >= 30  # a (2 pad + 1)^2 offset grid: the identity window is 1/9 (pad 1) or rarer


def test_draws_are_seeded_by_round_client_and_step_not_the_global_rng() -> None:
    aug = Augmentation(flip=True, pad=4)
    x = _asymmetric_images(16, 3, 32)
    before = x.clone()
    torch.manual_seed(0)
    a = aug.apply(x, seed=7, round_num=1, partition_id=0, step=0)
    torch.manual_seed(12345)
    torch.rand(100)
    b = aug.apply(x, seed=7, round_num=1, partition_id=0, step=0)
    assert torch.equal(a, b)
    assert torch.equal(x, before)  # the client's data is not changed in place
    for other in ({"seed": 8, "round_num": 1, "partition_id": 0, "step": 0},
                  {"seed": 7, "round_num": 2, "partition_id": 0, "step": 0},
                  {"seed": 7, "round_num": 1, "partition_id": 1, "step": 0},
                  {"seed": 7, "round_num": 1, "partition_id": 0, "step": 1}):
        assert not torch.equal(a, aug.apply(x, **other))


def _round(raw_scenario: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    scenario = parse_scenario(raw_scenario)
    setup = setup_for(scenario)
    model = setup.build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reply = run_client_round(scenario, 0, 1, state, {}, record=True)
    return reply.sent, reply.truth, (scenario, setup, state)


def test_the_fedsgd_gradient_is_the_gradient_of_the_augmented_batch_and_truth_is_unaugmented() -> None:
    sent, truth, (scenario, setup, state) = _round(raw())
    plain, plain_truth, _ = _round(raw(**{"federation.local.augmentation": "none"}))
    inputs, labels = setup.client_data(0)
    assert torch.equal(truth["inputs"], plain_truth["inputs"])  # the evaluator scores the un-augmented images
    assert all(any(torch.equal(t, row) for row in inputs) for t in truth["inputs"])  # rows of the client's data
    assert any(not torch.allclose(sent[k], plain[k]) for k in sent)  # augmentation changed the update
    # independently: the batch the schedule used, cropped by hand with the same draws, through plain autograd
    x, y = truth["inputs"], truth["labels"]
    model = setup.build_model()
    model.load_state_dict(state)
    model.train()
    hand = Augmentation(False, 1).apply(x, seed=scenario.seed, round_num=1, partition_id=0, step=0)
    loss = F.cross_entropy(model(normalize(hand, setup.task.mean, setup.task.std)), y)
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(sent[name], g, rtol=1e-5, atol=1e-6)


def test_fedavg_steps_are_augmented_and_dp_sgd_runs_on_the_augmented_batch() -> None:
    fedavg = {"federation.protocol": "fedavg", "federation.local.epochs": 2}
    sent, truth, _ = _round(raw(**fedavg))
    plain, plain_truth, _ = _round(raw(**fedavg, **{"federation.local.augmentation": "none"}))
    assert torch.equal(truth["inputs"], plain_truth["inputs"])
    assert any(not torch.allclose(sent[k], plain[k]) for k in sent)
    dp = {"defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 0.0, "max_grad_norm": 100.0,
                                                      "poisson": False}}]}
    dp_sent, dp_truth, _ = _round(raw(**dp))
    dp_plain, _, _ = _round(raw(**dp, **{"federation.local.augmentation": "none"}))
    assert any(not torch.allclose(dp_sent[k], dp_plain[k]) for k in dp_sent)
    no_dp, _, _ = _round(raw())  # sigma 0 and a clip no gradient reaches: DP-SGD sends the plain augmented gradient
    for k in no_dp:
        torch.testing.assert_close(dp_sent[k], no_dp[k], rtol=1e-4, atol=1e-6)


def test_refused_on_feature_vectors_and_zeroth_order_at_the_field() -> None:
    tabular = raw(**{"data": {"dataset": "diabetes"}, "model": {"name": "fc10"}})
    with pytest.raises(ScenarioError) as err:
        parse_scenario(tabular)
    assert err.value.path == "federation.local.augmentation" and "feature vectors" in err.value.reason
    parse_scenario(raw(**{"data": {"dataset": "diabetes"}, "model": {"name": "fc10"},
                          "federation.local.augmentation": "none"}))  # the same scenario without it runs
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw(**{"federation.protocol": "zeroth_order"}))
    assert err.value.path == "federation.local.augmentation"
    with pytest.raises(ValueError, match="images"):
        augmentation_for("flip_crop", "diabetes", (10,))


def test_validate_refuses_it_in_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "tab.yaml"
    path.write_text(yaml.safe_dump(raw(**{"data": {"dataset": "diabetes"}, "model": {"name": "fc10"}})),
                    encoding="utf-8")
    # in-process (typer's runner): a fresh interpreter costs ~10 s of imports; tests/test_cli.py keeps the real
    # console-script check of the one-line, exit-2 rule
    from typer.testing import CliRunner

    from fedsim.cli import app

    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "federation.local.augmentation" in lines[0] and "Traceback" not in lines[0]


@pytest.mark.slow  # ~19-34 s; seeding by (seed, round, partition, step) is checked in-process by the fast tests
@pytest.mark.ray
def test_ray_and_inprocess_augment_identically() -> None:
    """Same scenario and seed, both backends: identical augmented updates (fedavg, 2 epochs) and history."""
    from fedsim.simulation import run_federation

    scenario = parse_scenario(raw(**{"federation.protocol": "fedavg", "federation.local.epochs": 2,
                                     "federation.rounds": 2,
                                     "attacks": [{"name": "inverting_gradients", "rounds": [2], "clients": [0, 3],
                                                  "budget": {"iterations": 1}}]}))
    local = run_federation(scenario, backend="inprocess")
    ray = run_federation(scenario, backend="ray")
    assert [(h["round"], h.get("train_loss")) for h in ray.history] == [
        (h["round"], h.get("train_loss")) for h in local.history]
    assert [(u.round, u.partition_id) for u in ray.capture.updates] == [(2, 0), (2, 3)]
    for a, b in zip(local.capture.updates, ray.capture.updates, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
        assert torch.equal(a.truth.inputs, b.truth.inputs)
