"""Score a model-inversion result: does an independent classifier see the target class in it?

An inverted image has no ground-truth twin (the attacker asked for "a 3", not for a client's image), so
pixel metrics do not apply. As in GMI (Zhang et al., CVPR 2020) and IF-GMI (Qiu et al., ECCV 2024)
it is judged by an evaluation classifier the attacker never queried
(:mod:`fedsim.metrics.evaluator`: a different architecture trained on held-out data):

* ``mi_accuracy``: top-1 accuracy of the evaluation classifier on the inverted images vs. the target class;
* ``mi_top5``: top-5 accuracy (only with >= 5 classes);
* ``knn_distance``: mean over inverted images of the smallest L2 distance, in the evaluation
  classifier's penultimate (128-d) feature space, to a real held-out image of the target class
  (lower = closer to real data of that class);
* ``target_confidence``: the attacked model's mean softmax probability of the target class
  (averaged over ``forward_passes`` forward passes, since MID's released model is stochastic);
  high values with a low ``mi_accuracy`` mean the attack fooled the target without revealing the class.

All four are "higher leaks more" except ``knn_distance`` ("lower leaks more").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsim.data import normalize
from fedsim.metrics.evaluator import Evaluator
from fedsim.threat import Reconstruction

Score = dict[str, float | int | str | list]

MI_METRIC_DIRECTIONS: dict[str, str] = {
    "mi_accuracy": "higher leaks more",
    "mi_top5": "higher leaks more",
    "knn_distance": "lower leaks more",
    "target_confidence": "higher leaks more",
}


def _problem(rec: Reconstruction, evaluator: Evaluator) -> str | None:
    if rec.failed:
        return rec.failed
    images, labels = rec.images, rec.labels
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) == 0:
        return f"the inversion returned no (B, C, H, W) images (shape {tuple(getattr(images, 'shape', ()))})"
    if not isinstance(labels, Tensor) or labels.shape != (len(images),):
        return "the inversion returned no target class per image"
    shape, data = tuple(images.shape[1:]), tuple(evaluator.reference_x.shape[1:])
    if shape != data:
        return f"inverted images have shape {shape}, the data {data}"
    if int(labels.min()) < 0 or int(labels.max()) >= evaluator.num_classes:
        return f"target classes must lie in 0..{evaluator.num_classes - 1}"
    return None


def knn_distances(evaluator: Evaluator, images: Tensor, labels: Tensor) -> Tensor:
    """Per image, the smallest feature-space L2 distance to a held-out real image of its target class
    (``inf`` when the held-out set has no image of that class)."""
    feats = evaluator.features(images).cpu()
    ref_feats = evaluator.features(evaluator.reference_x).cpu()
    out = torch.full((len(images),), float("inf"))
    for c in labels.unique().tolist():
        mine, theirs = labels == c, evaluator.reference_y == c
        if bool(theirs.any()):
            out[mine] = torch.cdist(feats[mine], ref_feats[theirs]).min(dim=1).values
    return out


@torch.no_grad()
def target_confidence(model: nn.Module, images: Tensor, labels: Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...], forward_passes: int = 8) -> float:
    """The attacked model's mean softmax probability of the target class, averaged over forward passes."""
    device = next(model.parameters()).device
    x = normalize(images.to(device), mean, std)
    probs = torch.stack([model(x).softmax(dim=1) for _ in range(forward_passes)]).mean(0).cpu()
    return float(probs.gather(1, labels.view(-1, 1)).mean())


def score_model_inversion(rec: Reconstruction, evaluator: Evaluator, target_model: nn.Module | None = None,
                          forward_passes: int = 8) -> Score:
    """Model-inversion metrics of one result (see the module docstring); ``{"failed": reason}`` when the
    attack failed or returned unusable output (never raises on attack output).

    ``target_model`` (the released model, in eval mode) adds ``target_confidence``.
    """
    why = _problem(rec, evaluator)
    if why is not None:
        return {"failed": why}
    images, labels = rec.images.detach().float().clamp(0, 1).cpu(), rec.labels.long().cpu()
    logits = evaluator.logits(images).cpu()
    out: Score = {"num_images": len(images), "classes": sorted(set(labels.tolist()))}
    out["mi_accuracy"] = float((logits.argmax(1) == labels).float().mean())
    if evaluator.num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        out["mi_top5"] = float((top5 == labels.view(-1, 1)).any(dim=1).float().mean())
    dist = knn_distances(evaluator, images, labels)
    out["knn_distance"] = float(dist[torch.isfinite(dist)].mean()) if bool(torch.isfinite(dist).any()) else None
    per_class = {}
    for c in out["classes"]:
        mine = labels == c
        per_class[str(c)] = float((logits[mine].argmax(1) == c).float().mean())
    out["mi_accuracy_per_class"] = per_class
    if target_model is not None:
        out["target_confidence"] = target_confidence(target_model, images, labels, evaluator.mean, evaluator.std,
                                                     forward_passes)
    return out
