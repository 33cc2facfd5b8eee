"""One Adam step written out (optax.adam's update, the FZooS authors' optimizer; torch.optim.Adam's rule): the
clients' local steps and the adversarial task's client classifiers both use it. Written out because constructing a
``torch.optim`` optimizer first imports ``torch._dynamo`` (seconds in every fresh Ray actor)."""

from __future__ import annotations

from torch import Tensor

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def adam_step(x: Tensor, g: Tensor, m: Tensor, v: Tensor, t: int, lr: float) -> Tensor:
    """One Adam step (optax.adam's update, the authors' optimizer) in place on the moments ``m``, ``v``;
    ``t`` is the 1-based step count. Returns the new x (not clipped)."""
    m.mul_(ADAM_B1).add_(g, alpha=1 - ADAM_B1)
    v.mul_(ADAM_B2).addcmul_(g, g, value=1 - ADAM_B2)
    m_hat = m / (1 - ADAM_B1**t)
    v_hat = v / (1 - ADAM_B2**t)
    return x - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
