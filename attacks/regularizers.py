"""Image priors added to a gradient-matching objective, as a lookup table.

Each is a pure function of a batch ``x`` of shape (B, C, H, W) (normalized space) returning a scalar.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fedsim.image_priors import total_variation

Regularizer = Callable[[Tensor], Tensor]


def image_norm(x: Tensor) -> Tensor:
    """Mean over the batch of each image's L2 norm, ``mean_i |x_i|_2`` (Yin et al., CVPR 2021, R_l2)."""
    return x.flatten(1).norm(p=2, dim=1).mean()


REGULARIZERS: dict[str, Regularizer] = {"tv": total_variation, "norm": image_norm}
