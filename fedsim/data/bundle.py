"""The in-memory form of a dataset that every part of fedsim consumes, and helpers to build one.

Images are kept in *pixel space* (float32 in [0, 1], shape (N, C, H, W)); normalization happens
late, on the device, with :func:`fedsim.data.transforms.normalize`. Attacks reconstruct and score
images in this same pixel space, so the bundle carries the mean/std needed to go back and forth.

Tabular datasets (:mod:`fedsim.data.tabular`) hold feature vectors, float32 (N, d), already
standardized, with mean 0 and std 1 per feature (so normalization is the identity). A bundle's
``task`` says what its labels are: class indices (``classification``, int64 (N,)) or real targets
(``regression``, float32 (N,), one model output).

Text datasets (:mod:`fedsim.data.text`) hold TOKEN IDS, int64 (N, T): every example is exactly T tokens of
the dataset's tokenizer (``tokenizer``, a name :func:`fedsim.text.tokenizer.load_tokenizer` resolves), ids in
``[0, vocab_size)``; ``mean``/``std`` are () (normalization is the identity on token ids). Their labels are
class indices (N,) for ``classification`` (e.g. a verse's genre) or, for ``language_modeling``, the token
ids themselves (N, T): the model predicts token t+1 from tokens 0..t. ``groups`` (N,) int64 names each
example's source (a book), which ``partition.kind: by_source`` deals out; ``source_names`` names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from fedsim.errors import ScenarioError

TaskKind = Literal["classification", "regression", "language_modeling"]
TASK_KINDS: tuple[TaskKind, ...] = ("classification", "regression", "language_modeling")


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """Train/test tensors of one dataset plus what a model and an attack need to know about it.

    The dataclass is frozen but tensors are not: every :func:`fedsim.data.load_dataset` call returns
    fresh tensors, so mutating them in place never leaks into a later load.

    ``num_classes`` is the number of classes of a classification task and 0 for a regression task
    (it has none); :attr:`output_dim` is what the model outputs per example in either case.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel (images) or per feature (tabular)
    std: tuple[float, ...]
    attribution: str
    task: TaskKind = "classification"
    vocab_size: int = 0  # text: the tokenizer's vocabulary (token ids are < vocab_size); 0 for images and tables
    tokenizer: str = ""  # text: the tokenizer's name (fedsim.text.tokenizer.load_tokenizer)
    groups: torch.Tensor | None = None  # (N_train,) int64 source id of each TRAIN example (partition by_source)
    source_names: tuple[str, ...] = ()  # name of each source id (e.g. the book)

    @property
    def is_text(self) -> bool:
        """Whether the inputs are token ids (N, T) rather than pixels or features."""
        return self.vocab_size > 0

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            raise ValueError(f"{self.name}: task must be one of {TASK_KINDS}, got {self.task!r}")
        if self.is_text:
            self._check_text()
            return
        if self.task == "language_modeling":
            raise ValueError(f"{self.name}: a language_modeling task needs token inputs (vocab_size > 0)")
        label = (torch.int64, "int64") if self.task == "classification" else (torch.float32, "float32")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.float32 or x.dim() not in (2, 4):
                got = f"{x.dtype} {tuple(x.shape)}"
                raise ValueError(f"{self.name}: {split}_x must be float32 (N, C, H, W) or (N, d), got {got}")
            if y.dtype != label[0] or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split}_y must be {label[1]} of shape ({x.shape[0]},) "
                                 f"for a {self.task} task")
        if self.train_x.shape[1:] != self.test_x.shape[1:] and self.test_x.shape[0] > 0:
            raise ValueError(f"{self.name}: train and test inputs differ in shape")
        channels = self.train_x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel or feature ({channels})")
        if (self.task == "regression") != (self.num_classes == 0):
            raise ValueError(f"{self.name}: num_classes must be 0 exactly for a regression task")

    def _check_text(self) -> None:
        if self.mean or self.std:
            raise ValueError(f"{self.name}: token inputs take no mean/std (got {self.mean}, {self.std})")
        if (self.task == "regression") or (self.num_classes < 1):
            raise ValueError(f"{self.name}: a text task is classification or language_modeling with num_classes >= 1")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"{self.name}: {split}_x must be int64 token ids (N, T), got {x.dtype} "
                                 f"{tuple(x.shape)}")
            if len(x) and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
                raise ValueError(f"{self.name}: {split}_x holds token ids outside [0, {self.vocab_size})")
            want = tuple(x.shape) if self.task == "language_modeling" else (x.shape[0],)
            if y.dtype != torch.int64 or tuple(y.shape) != want:
                raise ValueError(f"{self.name}: {split}_y must be int64 of shape {want} for a {self.task} task")
        if self.train_x.shape[1:] != self.test_x.shape[1:] and self.test_x.shape[0] > 0:
            raise ValueError(f"{self.name}: train and test sequences differ in length")
        if self.groups is not None and tuple(self.groups.shape) != (self.train_x.shape[0],):
            raise ValueError(f"{self.name}: groups must be (N_train,) = ({self.train_x.shape[0]},)")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image, (d,) of one feature vector, or (T,) of one token sequence (:attr:`is_text`)."""
        return tuple(int(d) for d in self.train_x.shape[1:])

    @property
    def output_dim(self) -> int:
        """Outputs of the model per example: ``num_classes`` logits, or 1 prediction for a regression."""
        return 1 if self.task == "regression" else self.num_classes

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def with_train_subset(self, n: int) -> DatasetBundle:
        """The same bundle restricted to its first ``n`` training examples.

        Copies, so that the full training tensor (e.g. 188 MB for MNIST) can be freed.
        """
        groups = None if self.groups is None else self.groups[:n].clone()
        return replace(self, train_x=self.train_x[:n].clone(), train_y=self.train_y[:n].clone(), groups=groups)


def to_unit_float(pixels: np.ndarray | torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Integer pixels (N, C, H, W) in [0, max_value] -> a new float32 tensor in [0, 1]."""
    t = torch.as_tensor(pixels)
    return t.to(torch.float32).div_(float(max_value))


def class_interleaved(labels: np.ndarray) -> np.ndarray:
    """The order that takes the 1st example of each class, then the 2nd of each, ... (stable).

    Applied to sources sorted by class, so that the tail rule below and ``train_subset`` (first N)
    both see every class.
    """
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


def num_test_examples(n: int, test_fraction: float) -> int:
    """``ceil(n * test_fraction)``, clamped so that both splits keep at least one example.

    The tiny epsilon keeps float noise from rounding up an exact product (e.g. 20 * 0.2).
    """
    if n < 2:
        raise ScenarioError("data.dataset", f"cannot split {n} example(s) into a train and a test set")
    return min(n - 1, max(1, math.ceil(n * test_fraction - 1e-9)))


def tail_split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fedsim's rule for datasets without a test split: the LAST ``ceil(N * test_fraction)``
    examples are the test set and the rest, in their original order, the train set.

    Being order-based (no random draw), the split is the same for every seed and every machine, and
    ``train_x[0]`` is always the dataset's first image. Bundled files are stored class-interleaved
    where the source was sorted by class, so the tail is (near-)stratified.
    """
    k = num_test_examples(int(x.shape[0]), test_fraction)
    return x[:-k], y[:-k], x[-k:], y[-k:]
