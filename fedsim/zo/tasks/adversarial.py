"""The ``adversarial`` family: a federated black-box adversarial attack (spec §11.7; authors'
``funcs/adversarial.py: MNIST_Attack``), CPU-sized on a bundled dataset.

* Client i's private black box is its own classifier, a small MLP (``features -> 16 -> C``, ReLU: ``HIDDEN``) trained
  **independently** (spec §11.8: the authors fine-tune one network from client to client) on a class-skewed part
  of the training split (``mnist-5k`` by default, or ``digits``; fedsim's tail split with 20 % test): client i
  owns classes ``i, i + N, ...`` and they make up about ``class_portion`` of its data. Models and split do not
  depend on the seed (the authors attack fixed checkpoints); full-batch Adam (lr 0.01, 100 steps, weight decay
  1e-4: ``STEPS``, ``LR``, ``WEIGHT_DECAY``) from an initialisation seeded by the client's index.
* The shared target is one test image ``img`` with label ``y``; ``x`` in [0, 1]^d (``d`` = pixels, 784 for MNIST)
  is a perturbation ``to_box(x, box)`` in **pixel space** (``box`` 0.3: [-0.3, 0.3]) and the perturbed image is
  ``clip(img + delta, 0, 1)`` (a valid image). ``x0 = 0.5`` is no perturbation (spec §11.8: the authors' ``x0 = 0``
  maps to the box edge).
* ``f_i(x) = z_y - max_{j != y} z_j`` (the untargeted C&W margin of client i's logits z); the attack succeeds
  when ``F = mean_i f_i < 0`` (``success_below = 0``).
* Eligible images are the test images with ``F(x0) >= 0`` (the authors' rule); the seed draws their order and
  ``image_index`` picks one in it.

``truth``: ``classes`` (each client's own classes), ``label``, ``test_index``, ``eligible`` (how many test images
are eligible), ``class_counts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.isolation import seeded_global_rngs
from fedsim.seeding import derive_seed, numpy_rng
from fedsim.zo.adam import adam_step
from fedsim.zo.api import FederatedObjective
from fedsim.zo.spec import ZOTask
from fedsim.zo.tasks.base import (
    TASKS,
    TaskFamily,
    as_points,
    as_values,
    check_dataset,
    class_skewed_split,
    one_thread,
    own_classes,
    refuse_unused,
    to_box,
)

FIELDS = frozenset({"dataset", "class_portion", "box", "image_index"})
DATASETS_OK = {"mnist-5k": 10, "digits": 10}  # bundled (offline) sets with enough examples -> classes
DEFAULT_DATASET = "mnist-5k"
DEFAULT_BOX = 0.3
MAX_BOX = 1.0  # pixels lie in [0, 1]: a wider perturbation box reaches nothing new
HIDDEN = 16
STEPS, LR, WEIGHT_DECAY = 100, 0.01, 1e-4


@dataclass(frozen=True)
class ClientModels:
    """Every client's trained MLP as float64 arrays, the test images and which of them are eligible."""

    weights: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]  # (W1 (p, h), b1, W2 (h, C), b2)
    test_x: np.ndarray  # (t, p) pixels in [0, 1]
    test_y: np.ndarray  # (t,)
    eligible: np.ndarray  # test indices with F(x0) >= 0, ascending
    owners: list[list[int]]
    class_counts: list[list[int]]


def margins(weights: tuple[np.ndarray, ...], images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """C&W margins ``z_y - max_{j != y} z_j`` of one MLP on ``images`` (n, p) with labels (n,) -> (n,)."""
    w1, b1, w2, b2 = weights
    hidden = np.maximum(np.einsum("np,ph->nh", images, w1) + b1, 0.0)  # no threaded BLAS
    logits = np.einsum("nh,hc->nc", hidden, w2) + b2
    rows = np.arange(len(labels))
    z_y = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return z_y - others.max(axis=1)


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """Full-batch Adam (:func:`fedsim.zo.adam.adam_step`, torch's rule, L2 weight decay added to the gradient) on
    cross-entropy."""
    with seeded_global_rngs(seed):
        model = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
    params = list(model.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g, a, b in zip(params, grads, m1, m2, strict=True):
                p.copy_(adam_step(p, g + WEIGHT_DECAY * p, a, b, step, LR))
    first, second = model[0], model[2]
    return tuple(t.detach().to(torch.float64).numpy().copy() for t in
                 (first.weight.T, first.bias, second.weight.T, second.bias))


@cache
def client_models(dataset: str, num_clients: int, portion: float) -> ClientModels:
    """Train the N client classifiers (once per process; seed-independent) and find the eligible images."""
    from fedsim.data.bundled import load_bundled
    from fedsim.scenario import DataSpec

    bundle = load_bundled(dataset, DataSpec(dataset=dataset, test_fraction=0.2))
    c = bundle.num_classes
    train_x = bundle.train_x.reshape(bundle.num_train, -1)
    train_y = bundle.train_y
    owners = own_classes(c, num_clients)
    parts = class_skewed_split(train_y.numpy(), owners, portion, numpy_rng(0, "zo-task", "adversarial", dataset))
    with one_thread():
        weights = tuple(_train(train_x[idx], train_y[idx], c, derive_seed(0, "zo-task", "adversarial", dataset, i))
                        for i, idx in enumerate(parts))
    test_x = bundle.test_x.reshape(bundle.test_x.shape[0], -1).to(torch.float64).numpy()
    test_y = bundle.test_y.numpy().astype(np.int64)
    mean_margin = np.mean([margins(w, test_x, test_y) for w in weights], axis=0)
    return ClientModels(weights, test_x, test_y, np.flatnonzero(mean_margin >= 0.0), owners,
                        [np.bincount(train_y.numpy()[idx], minlength=c).tolist() for idx in parts])


@dataclass(frozen=True)
class AttackClient:
    """Client i's black box (picklable): ``(n, d)`` float64 points -> ``(n,)`` margins of its classifier on the
    perturbed shared image."""

    weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    image: np.ndarray  # (d,) pixels in [0, 1]
    label: int
    box: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pts = as_points(x, self.image.shape[0])
        adv = np.clip(self.image + to_box(pts, self.box), 0.0, 1.0)
        return as_values(margins(self.weights, adv, np.full(len(adv), self.label)))


def check(task: ZOTask, num_clients: int) -> None:
    refuse_unused(task, FIELDS)
    name = check_dataset(task, num_clients, DATASETS_OK, DEFAULT_DATASET)
    if task.box is not None and task.box > MAX_BOX:
        raise ScenarioError("box", f"{task.box} > {MAX_BOX}: pixels lie in [0, 1], so a half-width of {MAX_BOX} "
                                   "already reaches every image")
    # What validates must run: the chosen image must exist, so this trains the client models (seconds, cached).
    eligible = len(client_models(name, num_clients, task.class_portion).eligible)
    if eligible == 0:
        raise ScenarioError("class_portion", f"at {task.class_portion} the {num_clients} client models of {name} "
                                             f"misclassify every test image on average (no image with F(x0) >= 0 "
                                             f"to attack); lower it")
    if task.image_index >= eligible:
        raise ScenarioError("image_index", f"{task.image_index} is beyond the eligible images: {eligible} test "
                                           f"images of {name} are not already misclassified by the "
                                           f"{num_clients} client models (F(x0) >= 0); use 0..{eligible - 1}")


def build(task: ZOTask, num_clients: int, seed: int) -> FederatedObjective:
    """The attack objective on the seed-chosen eligible image (models shared by every seed)."""
    name = task.dataset or DEFAULT_DATASET
    models = client_models(name, num_clients, task.class_portion)  # check() made sure the image exists
    order = numpy_rng(seed, "zo-task", "adversarial", "image").permutation(len(models.eligible))
    test_index = int(models.eligible[order[task.image_index]])
    image, label = models.test_x[test_index].copy(), int(models.test_y[test_index])
    box = task.box or DEFAULT_BOX
    clients = [AttackClient(w, image, label, box) for w in models.weights]
    dim = image.shape[0]
    return FederatedObjective(
        name="adversarial",
        dim=dim,
        x0=torch.full((dim,), 0.5, dtype=torch.float64),
        clients=list(clients),
        weights=[1.0 / num_clients] * num_clients,
        truth={"classes": models.owners, "label": label, "test_index": test_index,
               "eligible": int(len(models.eligible)), "class_counts": models.class_counts, "dataset": name,
               "box": box},
        success_below=0.0,
    )


def dim(task: ZOTask, num_clients: int) -> int:
    """d: the pixels of the dataset's images (784 for mnist-5k, 64 for digits; the models check() trained)."""
    name = task.dataset or DEFAULT_DATASET
    return int(client_models(name, num_clients, task.class_portion).test_x.shape[1])


TASKS.add("adversarial", TaskFamily(fields=FIELDS, check=check, build=build, dim=dim,
                                    summary="black-box adversarial perturbation of one test image against "
                                            "every client's own classifier"))
