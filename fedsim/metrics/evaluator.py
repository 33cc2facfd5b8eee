"""The independent evaluation classifier that scores model inversion, trained by fedsim and cached.

Model-inversion papers (GMI, Zhang et al., CVPR 2020; IF-GMI, Qiu et al., ECCV 2024; PPA) judge an
inverted image by whether a *different* classifier, which the attacker never queried, recognises the
target class in it, and by its distance to real images of that class in that classifier's feature
space. fedsim trains that classifier itself:

* **architecture** ``evalcnn``: two conv(3x3)-BatchNorm-ReLU-MaxPool blocks (16, 32 channels), an
  adaptive 4x4 average pool, Linear(512 -> 128)-ReLU (the penultimate features used for the kNN
  distance) and Linear(128 -> classes). It is not one of the victim architectures (``fedsim list``).
* **data**: the dataset's TEST split only (``DataSpec`` with the scenario's dataset, root and
  ``test_fraction``), which no client ever trains on (``partition_indices`` splits the train split).
  For ``mnist-5k`` that is examples 4000..4999, also disjoint from the shipped ``mnist-dcgan`` prior
  (train examples 2000..3999). Its first 80 % train the evaluator (Adam, random +-2 px shifts), the
  last 20 % measure its held-out accuracy, which every model-inversion outcome reports as
  ``evaluator_accuracy`` so a reader can tell whether the judge is trustworthy. The kNN reference set
  is the whole test split.
* **seed**: fixed (:data:`EVALUATOR_SEED`), not the scenario's: the judge is a measuring instrument
  and stays the same across runs, seeds and defenses, so their numbers compare.
* **cache**: ``~/.fedsim/cache/evaluators/<key>.pt`` (``$FEDSIM_CACHE_DIR`` replaces ``~/.fedsim/cache``),
  where ``key`` hashes the dataset name, a fingerprint of the test tensors, the split, the
  architecture version, the seed and the epochs. Written atomically (temporary file, then rename),
  read with ``torch.load(weights_only=True)``; a stale file of an earlier fedsim is retrained over, a file
  at that name that fedsim did not write is left alone (the evaluator is then not cached).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.data import load_dataset, normalize
from fedsim.data.sources import Examples, client_examples, examples_of, overlap
from fedsim.errors import ScenarioError
from fedsim.outputs import write_atomic
from fedsim.scenario import DataSpec, Scenario
from fedsim.seeding import seed_torch, torch_generator

ARCH = "evalcnn-v1"
EVALUATOR_SEED = 0
TRAIN_FRACTION = 0.8
EPOCHS = 20
BATCH_SIZE = 64
LR = 2e-3
SHIFT = 2  # random translation (pixels) of the training images
FEATURE_DIM = 128
FORMAT = 1


class EvalCNN(nn.Module):
    """conv16-BN-ReLU-pool -> conv32-BN-ReLU-pool -> avgpool 4x4 -> Linear 128 (features) -> Linear classes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass
class Evaluator:
    """A trained evaluation classifier plus the held-out images it is judged against."""

    net: EvalCNN
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accuracy: float  # top-1 on the held-out last 20 % of the test split
    num_train: int
    num_val: int
    reference_x: Tensor  # the whole test split, pixel space (kNN reference)
    reference_y: Tensor
    path: Path
    trained_now: bool  # False when loaded from the cache

    @property
    def num_classes(self) -> int:
        return self.net.head.out_features

    @torch.no_grad()
    def logits(self, pixels: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        return _batched(self.net, normalize(pixels.to(device), self.mean, self.std))

    @torch.no_grad()
    def features(self, pixels: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        return _batched(self.net.features, normalize(pixels.to(device), self.mean, self.std))


def _batched(fn: nn.Module | object, x: Tensor, size: int = 512) -> Tensor:
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)]) if len(x) else x.new_zeros(0)


def training_examples(data: DataSpec) -> Examples:
    """What the evaluation classifier learns from and is judged against: the dataset's whole test split."""
    spec = DataSpec(dataset=data.dataset, root=data.root, test_fraction=data.test_fraction)
    return examples_of(data.dataset, "test", 0, None, spec=spec)


def check_evaluator_disjoint(scenario: Scenario) -> None:
    """Refuse (ScenarioError at ``attacks[i]``, the first model-inversion attack) a scenario whose evaluation
    classifier may have learned from the clients' own images, compared by data source like a GAN prior
    (:mod:`fedsim.data.sources`): MI accuracy would then reward recalling the clients' data."""
    from fedsim.plugins import attack_registry

    registry = attack_registry()
    inverting = [i for i, a in enumerate(scenario.attacks)
                 if a.name in registry and getattr(registry.get(a.name), "target", "") == "model"]
    if not inverting:
        return
    judge, clients = training_examples(scenario.data), client_examples(scenario.data)
    why = overlap(judge, clients)
    if why is not None:
        raise ScenarioError(f"attacks[{inverting[0]}]", f"the model-inversion evaluator learns from {judge.what}, "
                                                         f"which may overlap the clients' data ({clients.what}): "
                                                         f"{why}; use a dataset whose test split is disjoint from "
                                                         "its train split")


def cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR/evaluators`` or ``~/.fedsim/cache/evaluators``."""
    root = os.environ.get("FEDSIM_CACHE_DIR") or "~/.fedsim/cache"
    return Path(root).expanduser() / "evaluators"


def _fingerprint(x: Tensor, y: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(dataset: str, x: Tensor, y: Tensor) -> str:
    """Hash of what determines the evaluator: data (name + fingerprint), split, architecture, seed, epochs."""
    what = {"dataset": dataset, "data": _fingerprint(x, y), "split": f"test[:{TRAIN_FRACTION}]", "arch": ARCH,
            "seed": EVALUATOR_SEED, "epochs": EPOCHS, "lr": LR, "batch": BATCH_SIZE, "shift": SHIFT}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to SHIFT pixels per image (zero padding)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (SHIFT,) * 4)
    dy, dx = (torch.randint(0, 2 * SHIFT + 1, (2, len(x)), generator=gen)).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])


def train_evaluator(x: Tensor, y: Tensor, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                    epochs: int = EPOCHS) -> EvalCNN:
    """Train :class:`EvalCNN` on pixels ``x`` (CPU, deterministic given :data:`EVALUATOR_SEED`)."""
    with torch.random.fork_rng(devices=[]):
        seed_torch(EVALUATOR_SEED)
        net = EvalCNN(x.shape[1], num_classes)
    gen = torch_generator(EVALUATOR_SEED, "evaluator-batches")
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    steps = epochs * math.ceil(len(x) / BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=max(steps, 1))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH_SIZE):
            idx = order[i:i + BATCH_SIZE]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = F.cross_entropy(net(normalize(_shift(x[idx], gen), mean, std)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _read(path: Path, num_classes: int, channels: int) -> dict | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt cache file is retrained over, never trusted
        return None
    ok = isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("arch") == ARCH
    if not ok or payload.get("num_classes") != num_classes or payload.get("channels") != channels:
        return None
    return payload


def _write_atomically(path: Path, payload: dict) -> bool:
    """Cache the trained classifier (unique temporary name, fsync, rename). An unwritable cache (read-only
    home, full disk, FEDSIM_CACHE_DIR naming a file) only costs retraining next time: warn, never fail."""
    if path.exists() and not _is_cache_file(path):  # never replace a file fedsim did not write
        warnings.warn(f"evaluation classifier not cached: {path} exists and is not a fedsim cache file", stacklevel=2)
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh: torch.save(payload, fh))  # new temp name, fsync, rename
        return True
    except OSError as err:
        warnings.warn(f"evaluation classifier not cached ({path}): {err}", stacklevel=2)
        return False


def _is_cache_file(path: Path) -> bool:
    """Whether ``path`` holds an evaluator fedsim cached (any version of its format), so it may be replaced."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: not known to be ours
        return False
    return isinstance(payload, dict) and "format" in payload and str(payload.get("arch", "")).startswith("evalcnn")


_LOADED: dict[tuple[str, str], Evaluator] = {}
_UNCACHED: set[tuple[str, str]] = set()  # evaluators this process trained but could not write to the cache


def load_evaluator(data: DataSpec, device: torch.device | str = "cpu") -> Evaluator:
    """The evaluation classifier of ``data.dataset``: from this process, the disk cache, or trained now."""
    spec = DataSpec(dataset=data.dataset, root=data.root, download=data.download, test_fraction=data.test_fraction)
    bundle = load_dataset(spec)
    x, y = bundle.test_x, bundle.test_y
    key = cache_key(bundle.name, x, y)
    path = cache_dir() / f"{key}.pt"
    memo = (str(path), str(device))
    if memo in _LOADED and (_LOADED[memo].path.is_file() or memo in _UNCACHED):
        return _private(_LOADED[memo])  # (one whose cache write failed stays in memory for this process)
    n_train = int(len(x) * TRAIN_FRACTION)
    payload = _read(path, bundle.num_classes, x.shape[1]) if path.is_file() else None
    trained_now = payload is None
    if payload is None:
        net = train_evaluator(x[:n_train], y[:n_train], bundle.num_classes, bundle.mean, bundle.std)
        with torch.no_grad():
            pred = _batched(net, normalize(x[n_train:], bundle.mean, bundle.std)).argmax(1)
        accuracy = float((pred == y[n_train:]).float().mean()) if len(pred) else float("nan")
        payload = {"format": FORMAT, "arch": ARCH, "num_classes": bundle.num_classes, "channels": int(x.shape[1]),
                   "dataset": bundle.name, "accuracy": accuracy, "state": net.state_dict()}
        if not _write_atomically(path, payload):
            _UNCACHED.add(memo)
    net = EvalCNN(x.shape[1], bundle.num_classes)
    try:
        net.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, TypeError):  # a stale or foreign file under this key: train over it
        path.unlink(missing_ok=True)
        return load_evaluator(data, device)
    net.to(device).eval().requires_grad_(False)
    evaluator = Evaluator(net, tuple(bundle.mean), tuple(bundle.std), float(payload["accuracy"]), n_train,
                          len(x) - n_train, x, y, path, trained_now)
    _LOADED[memo] = evaluator
    return _private(evaluator)


def _private(evaluator: Evaluator) -> Evaluator:
    """The caller's own copy of a memoised evaluator: its network is a copy, so a caller that changes it
    (train mode, weights, device) cannot change what the next caller in this process is judged by; the
    reference images are cloned for the same reason."""
    return replace(evaluator, net=copy.deepcopy(evaluator.net), reference_x=evaluator.reference_x.clone(),
                   reference_y=evaluator.reference_y.clone())
