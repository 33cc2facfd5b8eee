"""The ``metric`` family: federated non-differentiable metric optimisation (spec §11.7; authors'
``funcs/opt_metric.py: MetricOpt``), on a dataset fedsim bundles (the authors' Covtype is not offline here).

Setup (a CPU-sized version of the authors'):

* The bundled dataset (``mnist-5k`` by default, or ``digits``), pixels flattened and standardised over all of
  it, is split 50/50 by fedsim's tail rule. The default is the larger set because a macro-metric over few
  examples is piecewise constant on a coarse grid: with 10 clients, 100 points in x0 +- 0.01 (FZooS's exploration
  radius) gave 1 distinct f_1 value on digits (~90 examples a client) and 10 on mnist-5k (250 a client).
  One scikit-learn ``MLPClassifier(hidden_layer_sizes=(30, 14), solver="lbfgs", alpha=1e-5, max_iter=10,
  random_state=1)`` (the authors' settings) is trained on the first half. The classifier does not depend on
  the seed (the authors load a fixed checkpoint).
* Clients hold disjoint class-skewed parts of the other half: client i owns the classes ``order[i::N]`` of a
  seed-drawn permutation ``order``; its own classes make up about ``class_portion`` of its data
  (:func:`~fedsim.zo.tasks.base.class_skewed_split`). Note the authors' ``portion`` means something else: the
  share of *classes* each client receives part of.
* ``f_i(x) = 1 - macro-<metric>`` (``task.metric``: f1, precision, recall, jaccard; scikit-learn's ``average=
  "macro"`` semantics: the mean over the labels present in the client's true or predicted labels, 0 for an
  empty denominator) of the classifier whose last two layers are shifted by ``to_box(x, box)`` (``box`` 0.2:
  perturbation in [-0.2, 0.2]; ``x0 = 0.5``: no perturbation, the trained classifier's value).

Layout of ``x`` (``d = 30*14 + 14 + 14*C + C``; 584 for 10 classes), in scikit-learn's ``(in, out)``
orientation, row-major: ``[coefs_[1] (30, 14), intercepts_[1] (14,), coefs_[2] (14, C), intercepts_[2] (C,)]``.
``truth["slices"]`` gives each block's ``(start, stop)`` and ``truth["bias_slice"]`` the output biases' (the
label-set attack reads the surrogate gradient there); ``truth["classes"]`` each client's own classes,
``truth["class_counts"]`` each client's label histogram (C,), ``truth["num_classes"]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from fedsim.seeding import numpy_rng
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

FIELDS = frozenset({"dataset", "class_portion", "metric", "box"})
DATASETS_OK = {"digits": 10, "mnist-5k": 10}  # bundled (offline) sets with enough examples -> classes
DEFAULT_DATASET = "mnist-5k"  # digits gives 10 clients ~90 examples each: f_i flat within x0 +- 0.01
DEFAULT_BOX = 0.2
HIDDEN = (30, 14)


@dataclass(frozen=True)
class TrainedClassifier:
    """The shared classifier and the pool the clients' data comes from (all float64 NumPy)."""

    coefs: tuple[np.ndarray, ...]  # scikit-learn coefs_: (in, 30), (30, 14), (14, C)
    intercepts: tuple[np.ndarray, ...]  # (30,), (14,), (C,)
    pool_x: np.ndarray  # (m, features) standardised held-out half
    pool_y: np.ndarray  # (m,) int64 labels
    num_classes: int


def layout(num_classes: int) -> dict[str, tuple[int, int]]:
    """``(start, stop)`` of each perturbed block in ``x`` (see the module docstring)."""
    h1, h2 = HIDDEN
    sizes = {"coefs_1": h1 * h2, "intercepts_1": h2, "coefs_2": h2 * num_classes, "intercepts_2": num_classes}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = (start, start + size)
        start += size
    return out


@cache
def trained_classifier(dataset: str) -> TrainedClassifier:
    """Train the task's classifier on ``dataset``'s first half (once per process; seed-independent)."""
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn: imported when a task first needs it (seconds)
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from fedsim.data.bundled import load_bundled
    from fedsim.scenario import DataSpec

    bundle = load_bundled(dataset, DataSpec(dataset=dataset, test_fraction=0.5))
    train_x = bundle.train_x.reshape(bundle.num_train, -1).to(torch.float64).numpy()
    pool_x = bundle.test_x.reshape(bundle.test_x.shape[0], -1).to(torch.float64).numpy()
    scaler = StandardScaler().fit(np.concatenate([train_x, pool_x]))
    clf = MLPClassifier(solver="lbfgs", alpha=1e-5, hidden_layer_sizes=HIDDEN, max_iter=10, random_state=1)
    with warnings.catch_warnings(), one_thread():  # the weights must not depend on the BLAS thread count
        warnings.simplefilter("ignore", ConvergenceWarning)  # 10 iterations on purpose (authors' setting)
        clf.fit(scaler.transform(train_x), bundle.train_y.numpy())
    if list(clf.classes_) != list(range(bundle.num_classes)):
        raise ValueError(f"{dataset}: the classifier saw classes {list(clf.classes_)}, not 0..{bundle.num_classes - 1}")
    return TrainedClassifier(tuple(np.array(c, dtype=np.float64) for c in clf.coefs_),
                             tuple(np.array(b, dtype=np.float64) for b in clf.intercepts_),
                             scaler.transform(pool_x), bundle.test_y.numpy().astype(np.int64), bundle.num_classes)


def macro_scores(pred: np.ndarray, y: np.ndarray, num_classes: int, metric: str) -> np.ndarray:
    """Macro-``metric`` of each row of predictions ``pred`` (n, m) against labels ``y`` (m,) -> (n,).

    scikit-learn's ``average="macro"``: the mean over labels in ``y`` or in that row's predictions; a label with
    an empty denominator (precision: never predicted; recall: never true) scores 0.
    """
    onehot_pred = pred[:, :, None] == np.arange(num_classes)  # (n, m, C)
    truth = y[:, None] == np.arange(num_classes)  # (m, C)
    tp = (onehot_pred & truth[None]).sum(axis=1).astype(np.float64)  # (n, C)
    n_pred = onehot_pred.sum(axis=1).astype(np.float64)
    n_true = np.broadcast_to(truth.sum(axis=0).astype(np.float64), n_pred.shape)
    denom = {"f1": n_pred + n_true, "precision": n_pred, "recall": n_true,
             "jaccard": n_pred + n_true - tp}[metric]
    numer = 2.0 * tp if metric == "f1" else tp
    score = np.divide(numer, denom, out=np.zeros_like(numer), where=denom > 0)
    present = (n_pred + n_true) > 0
    return (score * present).sum(axis=1) / present.sum(axis=1)


@dataclass(frozen=True)
class MetricClient:
    """Client i's black box (picklable): ``(n, d)`` float64 points -> ``(n,)`` ``1 - macro-metric`` values."""

    hidden: np.ndarray  # (m, 30): first-layer activations of the client's examples (the layer x leaves alone)
    labels: np.ndarray  # (m,) the client's private labels
    coefs: tuple[np.ndarray, np.ndarray]  # (30, 14), (14, C)
    intercepts: tuple[np.ndarray, np.ndarray]  # (14,), (C,)
    box: float
    metric: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (w1, w2), (b1, b2) = self.coefs, self.intercepts
        c = b2.shape[0]
        blocks = layout(c)
        delta = to_box(as_points(x, blocks["intercepts_2"][1]), self.box)  # (n, d)

        def part(name: str, shape: tuple[int, ...]) -> np.ndarray:
            start, stop = blocks[name]
            return delta[:, start:stop].reshape(delta.shape[0], *shape)

        w1p, b1p = w1 + part("coefs_1", w1.shape), b1 + part("intercepts_1", b1.shape)
        w2p, b2p = w2 + part("coefs_2", w2.shape), b2 + part("intercepts_2", b2.shape)
        # einsum without optimize runs its own loops (no threaded BLAS): thread-count independent.
        h2 = np.maximum(np.einsum("mi,nio->nmo", self.hidden, w1p) + b1p[:, None, :], 0.0)  # (n, m, 14)
        logits = np.einsum("nmi,nio->nmo", h2, w2p) + b2p[:, None, :]  # (n, m, C)
        pred = logits.argmax(axis=2)
        return as_values(1.0 - macro_scores(pred, self.labels, c, self.metric))


def check(task: ZOTask, num_clients: int) -> None:
    refuse_unused(task, FIELDS)
    check_dataset(task, num_clients, DATASETS_OK, DEFAULT_DATASET)


def build(task: ZOTask, num_clients: int, seed: int) -> FederatedObjective:
    """The metric objective: the shared classifier, a seed-drawn class-skewed split of the held-out half."""
    name = task.dataset or DEFAULT_DATASET
    clf = trained_classifier(name)
    c = clf.num_classes
    rng = numpy_rng(seed, "zo-task", "metric", "split")
    owners = own_classes(c, num_clients, rng.permutation(c))
    parts = class_skewed_split(clf.pool_y, owners, task.class_portion, rng)
    hidden_all = np.maximum(np.einsum("mp,ph->mh", clf.pool_x, clf.coefs[0]) + clf.intercepts[0], 0.0)  # (m, 30)
    box = task.box or DEFAULT_BOX
    clients = [MetricClient(hidden_all[idx].copy(), clf.pool_y[idx].copy(), (clf.coefs[1], clf.coefs[2]),
                            (clf.intercepts[1], clf.intercepts[2]), box, task.metric) for idx in parts]
    blocks = layout(c)
    dim = blocks["intercepts_2"][1]
    return FederatedObjective(
        name="metric",
        dim=dim,
        x0=torch.full((dim,), 0.5, dtype=torch.float64),
        clients=list(clients),
        weights=[1.0 / num_clients] * num_clients,
        truth={"classes": owners, "num_classes": c, "bias_slice": blocks["intercepts_2"], "slices": blocks,
               "class_counts": [np.bincount(clf.pool_y[idx], minlength=c).tolist() for idx in parts],
               "pool_indices": [idx.tolist() for idx in parts], "dataset": name, "metric": task.metric,
               "box": box},
    )


def dim(task: ZOTask, num_clients: int) -> int:
    """d of the perturbed layers (584 for the 10 classes of every bundled set here)."""
    return layout(DATASETS_OK[task.dataset or DEFAULT_DATASET])["intercepts_2"][1]


TASKS.add("metric", TaskFamily(fields=FIELDS, check=check, build=build, dim=dim,
                               summary="1 - macro-F1 (etc.) of a perturbed classifier on each "
                                       "client's class-skewed data"))
