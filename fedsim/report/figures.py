"""Pictures a person wants to look at: ground truth beside reconstruction, and utility per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by CLIs, CI and Ray drivers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _as_image(x: torch.Tensor):  # noqa: ANN202
    x = x.detach().clamp(0, 1).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def reconstruction_grid(outcomes: Sequence[Any], path: Path, max_images: int = 8) -> bool:
    """One pair of rows per attack outcome: ground truth on top, reconstruction below (matched order)."""
    rows = [o for o in outcomes if o.truth is not None and len(o.truth) > 0]
    if not rows:
        return False
    cols = min(max_images, max(len(o.truth) for o in rows))
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(1.6 * cols + 1.2, 3.4 * len(rows)), squeeze=False)
    for r, outcome in enumerate(rows):
        order = outcome.metrics.get("order") or list(range(len(outcome.truth)))
        per_image = outcome.metrics.get("psnr_per_image") or []
        for c in range(cols):
            top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if c >= len(outcome.truth):
                top.axis("off")
                bottom.axis("off")
                continue
            cmap = "gray" if outcome.truth.shape[1] == 1 else None
            top.imshow(_as_image(outcome.truth[c]), cmap=cmap, vmin=0, vmax=1)
            rec_idx = order[c] if c < len(order) else None
            recon = outcome.reconstruction
            if recon is not None and rec_idx is not None and 0 <= rec_idx < len(recon):
                bottom.imshow(_as_image(recon[rec_idx]), cmap=cmap, vmin=0, vmax=1)
                if c < len(per_image):
                    bottom.set_xlabel(f"{per_image[c]:.1f} dB", fontsize=8)
            else:
                bottom.text(0.5, 0.5, "failed" if outcome.failed else "-", ha="center", va="center", fontsize=8)
            if c == 0:
                top.set_ylabel("truth", fontsize=8)
                tag = " (oracle)" if outcome.oracle else ""
                bottom.set_ylabel(f"{outcome.attack}{tag}\nround {outcome.round}, client {outcome.partition_id}",
                                  fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def utility_curve(history: Sequence[dict[str, float]], path: Path) -> bool:
    """Test accuracy (and loss) of the global model per round; the loss alone for a task without accuracy
    (regression)."""
    rows = [h for h in history if "test_accuracy" in h]
    if not rows:
        return _loss_curve([h for h in history if "test_loss" in h], path)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["round"] for h in rows], [h["test_accuracy"] for h in rows], marker="o", label="test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot([h["round"] for h in rows], [h["test_loss"] for h in rows], color="tab:red", ls="--", label="test loss")
    ax2.set_ylabel("test loss", color="tab:red")
    ax.set_title("Utility of the global model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _loss_curve(rows: Sequence[dict[str, float]], path: Path) -> bool:
    """Test loss per round (a regression's mean squared error); False when no round was evaluated."""
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["round"] for h in rows], [h["test_loss"] for h in rows], marker="o", color="tab:red", label="test loss")
    ax.set_xlabel("round")
    ax.set_ylabel("test loss")
    ax.set_title("Utility of the global model (test loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
