"""Adam with step decay on one input tensor, written out: ``torch.optim.Adam`` + ``MultiStepLR``, step for step.

Used by the SEQUENTIAL path of Inverting Gradients (``input_steps``: one restart after another). Written out for
start-up and per-step cost, not for different numbers: every ``torch.optim`` optimizer's ``step`` imports
``torch._dynamo`` on its first call (1.5-2.5 s of CPU, as much as ``import torch``; the first ``reconstruct`` of a
process that has not trained, e.g. the driver of a Ray run, paid it), and its hooks, profiler records and scheduler
bookkeeping cost about 0.2 ms per step against 0.04 ms for the arithmetic (``benchmarks/startup.py``).
``fedsim.zo.adam`` writes out the same rule for the zeroth-order clients. The batched path
(:class:`fedsim.attacks.batched.BatchedTrials`, IG's ``batched``) still steps with ``torch.optim.Adam`` +
``MultiStepLR``: ``torch.func.vmap`` imports ``torch._dynamo`` itself, so there this would save no start-up. On
the CPU torch's Adam runs its single-tensor implementation there (the arithmetic here); on CUDA its default is the
foreach implementation, the same formula but not checked to be the same bits.

The update is the one of torch's single-tensor Adam (``torch.optim.adam._single_tensor_adam``; defaults betas
(0.9, 0.999), eps 1e-8, no weight decay, not amsgrad) in the same operation order, so the iterates are bitwise
torch's (``tests/test_input_adam.py`` checks that against ``torch.optim``, on the CPU and, where there is one, on
a CUDA device with ``foreach=False``): Kingma & Ba, ICLR 2015, Algorithm 1,
with the bias corrections folded into the step size and the denominator. The learning rate follows
``MultiStepLR``: multiplied by ``gamma ** n`` before step ``k`` (0-based) when ``k`` appears ``n`` times among the
milestones (the scheduler's constructor applies epoch 0, each later ``sched.step()`` epoch ``k``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


class InputAdam:
    """Adam on ``x`` (updated in place) with the learning rate ``lr`` decayed by ``gamma`` at ``milestones``."""

    def __init__(self, x: Tensor, lr: float, milestones: Sequence[int] = (), gamma: float = 0.1) -> None:
        self.x, self.gamma = x, gamma
        self.exp_avg = torch.zeros_like(x, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(x, memory_format=torch.preserve_format)
        self.milestones = Counter(milestones)
        self.steps = 0
        self.lr = lr * gamma ** self.milestones[0] if 0 in self.milestones else lr

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        """One Adam step of ``x`` along ``grad`` (same shape), then the learning-rate schedule's step."""
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - BETA1)
        self.exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        step = float(self.steps)
        bias_correction1 = 1 - BETA1**step
        bias_correction2 = 1 - BETA2**step
        step_size = self.lr / bias_correction1
        denom = (self.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(EPS)
        self.x.addcdiv_(self.exp_avg, denom, value=-step_size)
        if self.steps in self.milestones:
            self.lr = self.lr * self.gamma ** self.milestones[self.steps]
