"""Reconstruction images kept for reports: ``reconstructions.npz`` in a run directory, and PNG encoding.

Per attack outcome ``i`` the archive holds ``truth_i`` (the client's real batch) and ``recon_i`` (the
attack's images) as uint8 N x C x H x W (pixel space [0, 1] scaled to 0..255: 4x smaller than float32,
exact enough to look at), ``order_i`` (reconstruction index matched to each real image, as scored) and,
for model-inversion outcomes, ``labels_i`` (the target class of each inverted image). ``meta`` is a JSON
string with attack, round, client, oracle, failure and per-image PSNR. It loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedsim import jsonio
from fedsim.outcomes import time_limit_note

MAX_IMAGES = 64  # per outcome: enough for any gallery, small on disk


@dataclass
class GalleryEntry:
    """One attack outcome's images, in the order the evaluator matched them."""

    attack: str
    round: int
    client: int
    oracle: bool = False
    failed: str | None = None
    truth: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    order: list[int] = field(default_factory=list)
    labels: list[int] | None = None
    psnr_per_image: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    nothing_isolated: str | None = None  # the attack ran and isolated no input: why (its stats; a measured 0)
    time_limited: str | None = None  # budget.time_limit_s stopped it (fedsim.outcomes.time_limit_note)

    def pairs(self, limit: int) -> list[tuple[np.ndarray | None, np.ndarray | None, float | None, int | None]]:
        """(truth, matched reconstruction, PSNR, target class) per column, at most ``limit`` columns."""
        if self.truth is None:  # model inversion: no private image to compare with
            n = 0 if self.reconstruction is None else len(self.reconstruction)
            return [(None, self.reconstruction[i], None, self._label(i)) for i in range(min(n, limit))]
        out = []
        for c in range(min(len(self.truth), limit)):
            idx = self.order[c] if c < len(self.order) else None
            rec = self.reconstruction
            image = rec[idx] if rec is not None and idx is not None and 0 <= idx < len(rec) else None
            psnr = self.psnr_per_image[c] if c < len(self.psnr_per_image) else None
            out.append((self.truth[c], image, psnr, None))
        return out

    def _label(self, i: int) -> int | None:
        return self.labels[i] if self.labels is not None and i < len(self.labels) else None


def to_uint8(images: Any) -> np.ndarray | None:
    """A tensor/array of images in [0, 1] as uint8 N x C x H x W (None when absent or not image-shaped)."""
    if images is None:
        return None
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or len(arr) == 0:
        return None
    return np.round(np.clip(np.nan_to_num(arr[:MAX_IMAGES]), 0.0, 1.0) * 255).astype(np.uint8)


def _target_classes(outcome: Any) -> list[int] | None:
    """Target classes of a model-inversion outcome, wherever its attack put them."""
    for value in (getattr(outcome, "labels", None), getattr(outcome, "targets", None),
                  *(outcome.metrics.get(k) for k in ("target_classes", "targets", "target_labels"))):
        if value is not None:
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            return [int(v) for v in arr.reshape(-1)[:MAX_IMAGES]]
    return None


def save_reconstructions(outcomes: Sequence[Any], path: Path) -> bool:
    """Write ``reconstructions.npz`` (see module doc); False, and nothing written, when no outcome has images."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, o in enumerate(outcomes):
        truth, recon = to_uint8(o.truth), to_uint8(o.reconstruction)
        if truth is not None:
            arrays[f"truth_{i}"] = truth
        if recon is not None:
            arrays[f"recon_{i}"] = recon
        order = o.metrics.get("order")
        if isinstance(order, list | tuple):
            arrays[f"order_{i}"] = np.asarray(order, dtype=np.int64)
        labels = _target_classes(o) if truth is None else None
        if labels is not None:
            arrays[f"labels_{i}"] = np.asarray(labels, dtype=np.int64)
        keep = {k: v for k, v in o.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        classes = o.metrics.get("classes")  # model inversion: the set of target classes
        if isinstance(classes, list | tuple):
            keep["classes"] = [int(c) for c in classes if isinstance(c, int)]
        meta.append({"attack": o.attack, "attack_index": o.attack_index, "round": o.round, "client": o.partition_id,
                     "oracle": bool(o.oracle), "failed": o.failed, "metrics": keep,
                     "nothing_isolated": (getattr(o, "stats", None) or {}).get("nothing_isolated"),
                     "time_limited": None if o.failed else time_limit_note(getattr(o, "stats", None)),
                     "psnr_per_image": [float(v) for v in o.metrics.get("psnr_per_image") or []]})
    if not any(k.startswith(("truth_", "recon_")) for k in arrays):
        return False
    np.savez_compressed(path, meta=np.array(jsonio.dumps(meta)), **arrays)
    return True


def load_reconstructions(path: Path) -> list[GalleryEntry]:
    """The entries of a ``reconstructions.npz`` ([] when the file is absent or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = jsonio.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except (OSError, ValueError, KeyError):
        return []
    entries = []
    for i, m in enumerate(meta):
        labels = arrays.get(f"labels_{i}")
        order = arrays.get(f"order_{i}")
        entries.append(GalleryEntry(
            attack=str(m.get("attack")), round=int(m.get("round", 0)), client=int(m.get("client", 0)),
            oracle=bool(m.get("oracle")), failed=m.get("failed"), truth=arrays.get(f"truth_{i}"),
            reconstruction=arrays.get(f"recon_{i}"), order=[] if order is None else [int(v) for v in order],
            labels=None if labels is None else [int(v) for v in labels],
            psnr_per_image=list(m.get("psnr_per_image") or []), metrics=dict(m.get("metrics") or {}),
            nothing_isolated=m.get("nothing_isolated"), time_limited=m.get("time_limited"),
        ))
    return entries


def _hwc(image: np.ndarray) -> np.ndarray:
    return image[0] if image.shape[0] == 1 else np.transpose(image[:3], (1, 2, 0))


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG of one uint8 C x H x W image (grey or RGB), upscaled ``scale`` x with nearest neighbours."""
    pic = Image.fromarray(np.ascontiguousarray(_hwc(image)))
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """An ``data:image/png;base64,...`` URI, so the HTML report needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def strip_png(entry: GalleryEntry, path: Path, limit: int = 8) -> bool:
    """A PNG of the gallery row: real images on top, matched reconstructions below (inverted images only,
    for model inversion), 2-pixel white gaps; False when there is nothing to draw."""
    pairs = entry.pairs(limit)
    sample = next((img for pair in pairs for img in pair[:2] if img is not None), None)
    if sample is None:
        return False
    c, h, w = sample.shape
    scale = max(1, 64 // max(h, w))  # about 64 px per image: 8x8 digits and 32x32 CIFAR alike
    rows = 2 if entry.truth is not None else 1
    gap = 2
    canvas = np.full((rows * (h + gap) - gap, len(pairs) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for col, (truth, rec, _, _) in enumerate(pairs):
        images = (truth, rec) if rows == 2 else (rec,)
        for row, img in enumerate(images):
            if img is not None:
                rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
                y, x = row * (h + gap), col * (w + gap)
                canvas[y:y + h, x:x + w] = np.transpose(rgb, (1, 2, 0))
    pic = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    pic.save(path, format="PNG", optimize=True)
    return True
