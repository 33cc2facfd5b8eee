"""Image priors shared by the attacks and the server's own inversions (stale-update GI conversion): the core may
not import an attack plug-in, so the one definition lives here and :mod:`fedsim.attacks.regularizers` re-exports it."""

from __future__ import annotations

from torch import Tensor


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation in mean form of images ``x`` (..., H, W): ``mean|d_x x| + mean|d_y x|``.

    This is breaching's ``TotalVariation`` (Geiping et al., NeurIPS 2020, eq. 4 uses it with weight
    alpha_TV), averaged over pixels rather than summed, so its weight does not depend on image size.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy
