"""The written-out Adam of the input-optimizing attacks is torch.optim.Adam + MultiStepLR, bitwise (the second
implementation here is torch's own), on signed and raw gradients, with box projection, and when milestones fall on
step 0 (fewer than 3 iterations) or coincide; on the CPU and, where there is one, on a CUDA device."""

from __future__ import annotations

import pytest
import torch

from fedsim.attacks.input_adam import InputAdam

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize(("iterations", "signed", "lr"), [(1, True, 0.1), (2, False, 0.1), (3, True, 0.3),
                                                          (8, True, 0.1), (40, False, 0.05)])
def test_iterates_equal_torch_adam_with_step_decay(iterations: int, signed: bool, lr: float, device: str) -> None:
    """On CUDA torch's default Adam is the foreach kernel; the single-tensor one (foreach=False) is the reference."""
    gen = torch.Generator().manual_seed(iterations)
    target = torch.randn(2, 3, 5, 5, generator=gen).to(device)
    x0 = torch.randn(2, 3, 5, 5, generator=gen).to(device)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]

    def grad_of(x: torch.Tensor) -> torch.Tensor:
        g = torch.sin(3 * x) + x - target  # not a quadratic: the moments see varied gradients
        return g.sign() if signed else g

    ref = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=lr, foreach=False)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    ours = x0.clone()
    adam = InputAdam(ours, lr, milestones)
    for _ in range(iterations):
        ref.grad = grad_of(ref.detach())
        opt.step()
        sched.step()
        adam.step(grad_of(ours))
        with torch.no_grad():
            ref.clamp_(-1.5, 1.5)
        ours.clamp_(-1.5, 1.5)
        assert torch.equal(ours, ref.detach())
        assert adam.lr == opt.param_groups[0]["lr"]
