"""Tutorial step 12 as shipped (seed 0): leakage over the rounds of a real FedAvg run (docs/tutorial.md step 12).

Measured: fedavg_inversion 13.1 dB (round 1), 11.4 (10), 8.3 (40); inverting_gradients 14.1, 10.9, 11.1; each digit's
own flat mean colour 8.5 dB (computed here from the truth, independently of the run's scoring); test accuracy
0.16 -> 0.77. Margins leave room for another CPU's float order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsim.run import run_scenario
from fedsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


def _flat_colour_psnr(truth: torch.Tensor) -> float:
    """Mean PSNR of each image against itself filled with its own per-channel mean colour."""
    flat = truth.mean(dim=(2, 3), keepdim=True).expand_as(truth)
    mse = ((truth - flat) ** 2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse)).mean())


@pytest.mark.slow
def test_step12_leaks_most_in_round_one_and_the_unrolling_attack_fades_to_a_flat_guess(tmp_path: Path) -> None:
    result = run_scenario(load_scenario(ROOT / "scenarios" / "tutorial" / "12_real_training.yaml",
                                        ["device=cpu"]), tmp_path / "tut12")
    psnr = {(o.attack, o.round): float(o.metrics["psnr_mean"]) for o in result.outcomes if o.failed is None}
    assert len(psnr) == 6
    first = next(o for o in result.outcomes if o.attack == "fedavg_inversion" and o.round == 1)
    flat = _flat_colour_psnr(first.truth.float())
    assert psnr[("fedavg_inversion", 1)] > flat + 3.0  # 13.1 vs 8.5 dB
    assert psnr[("inverting_gradients", 1)] > flat + 3.0  # 14.1
    for attack in ("fedavg_inversion", "inverting_gradients"):
        assert psnr[(attack, 1)] > max(psnr[(attack, 10)], psnr[(attack, 40)]) + 1.0
    assert psnr[("fedavg_inversion", 40)] < flat + 1.5  # 8.3: at the flat-colour guess
    accuracy = [h["test_accuracy"] for h in result.history if "test_accuracy" in h]
    assert accuracy[-1] > accuracy[0] + 0.4  # a real training run: 0.16 -> 0.77
