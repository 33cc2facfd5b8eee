"""fedsim.data: bundled datasets, torchvision/imagefolder failure modes, partitions, normalization."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch

from fedsim.data import DATASETS, DatasetBundle, denormalize, load_dataset, normalize, partition_indices
from fedsim.errors import DataUnavailableError, RegistryError, ScenarioError
from fedsim.scenario import DataSpec, PartitionSpec

BUNDLED = {  # name: (total examples, (C, H, W), num_classes)
    "digits": (1797, (1, 8, 8), 10),
    "mnist-5k": (5000, (1, 28, 28), 10),
    "mnist-mini": (20, (1, 28, 28), 10),
    "fashion-mnist-mini": (20, (1, 28, 28), 10),
    "cifar10-mini": (20, (3, 32, 32), 10),
    "cifar100-mini": (20, (3, 32, 32), 100),
}


def _npz(name: str) -> dict[str, np.ndarray]:
    with (resources.files("fedsim.data") / "assets" / f"{name}.npz").open("rb") as fh, np.load(fh) as npz:
        return {k: npz[k] for k in npz.files}


def test_registry_lists_every_dataset() -> None:
    names = set(DATASETS)
    assert set(BUNDLED) | {"mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"} <= names
    assert "cifar10-mini" in DATASETS and DATASETS.names() == sorted(names)
    with pytest.raises(RegistryError, match="known:"):
        load_dataset(DataSpec(dataset="no-such-data"))


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_dataset_loads(name: str) -> None:
    total, shape, num_classes = BUNDLED[name]
    b = load_dataset(DataSpec(dataset=name, test_fraction=0.2))
    assert isinstance(b, DatasetBundle) and b.name == name and b.attribution
    assert b.input_shape == shape and b.num_classes == num_classes
    n_test = int(np.ceil(total * 0.2 - 1e-9))
    assert (len(b.train_x), len(b.test_x)) == (total - n_test, n_test)
    for x, y in ((b.train_x, b.train_y), (b.test_x, b.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
    assert float(b.train_x.max()) > 0.9  # scaled to the full [0, 1] range, not left at 0..1/16
    assert len(b.mean) == len(b.std) == shape[0]


def test_cifar10_mini_first_image_is_foolbox_cat() -> None:
    raw = _npz("cifar10-mini")
    b = load_dataset(DataSpec(dataset="cifar10-mini"))
    assert int(b.train_y[0]) == 3 and raw["y"][0] == 3 and raw["x"].dtype == np.uint8
    assert torch.equal((b.train_x[0] * 255).round().to(torch.uint8), torch.from_numpy(raw["x"][0]))
    assert b.train_y.tolist() + b.test_y.tolist() == raw["y"].tolist()  # original order kept


def test_tail_split_and_train_subset() -> None:
    b = load_dataset(DataSpec(dataset="cifar10-mini", test_fraction=0.25))
    assert (len(b.train_x), len(b.test_x)) == (15, 5)
    raw = _npz("cifar10-mini")
    assert b.test_y.tolist() == raw["y"][-5:].tolist()
    sub = load_dataset(DataSpec(dataset="digits", train_subset=7))
    full = load_dataset(DataSpec(dataset="digits"))
    assert len(sub.train_x) == 7 and torch.equal(sub.train_x, full.train_x[:7])
    assert len(sub.test_x) == len(full.test_x)
    with pytest.raises(ScenarioError, match="train_subset"):
        load_dataset(DataSpec(dataset="cifar10-mini", train_subset=17))


def test_mnist_5k_test_split_is_stratified() -> None:
    b = load_dataset(DataSpec(dataset="mnist-5k"))
    assert np.bincount(b.test_y.numpy(), minlength=10).tolist() == [100] * 10


def test_loads_are_independent_copies() -> None:
    a = load_dataset(DataSpec(dataset="mnist-mini"))
    a.train_x.zero_()
    a.train_y.fill_(0)
    b = load_dataset(DataSpec(dataset="mnist-mini"))
    assert float(b.train_x.max()) > 0 and int(b.train_y[0]) == 7


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_torchvision_dataset_missing_offline(name: str, tmp_path) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_dataset(DataSpec(dataset=name, root=str(tmp_path), download=False))
    msg = str(info.value)
    assert str(tmp_path) in msg and name in msg and "data.download" in msg
    assert "\n" not in msg


def test_imagefolder(tmp_path) -> None:
    from PIL import Image

    with pytest.raises(ScenarioError, match="data.root"):
        load_dataset(DataSpec(dataset="imagefolder"))
    with pytest.raises(DataUnavailableError, match="train"):
        load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path)))
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.png")
    b = load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path), test_fraction=0.2))
    assert b.input_shape == (3, 6, 4) and b.num_classes == 2
    assert b.train_y.tolist() == [0, 1, 0, 1, 0, 1, 0, 1] and b.test_y.tolist() == [0, 1]
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(ScenarioError, match="same size"):
        load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path)))


def test_imagefolder_gray_with_test_split(tmp_path) -> None:
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        for cls in ("a", "b", "c"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((7, 9), 40 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    b = load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path)))
    assert b.input_shape == (1, 7, 9) and b.num_classes == 3 and len(b.mean) == 1
    assert b.train_y.tolist() == [0, 1, 2] * 3 and b.test_y.tolist() == [0, 1, 2] * 2
    assert torch.allclose(b.test_x[3], torch.full((1, 7, 9), 40 / 255))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 5, 7)])
def test_normalize_round_trip(shape: tuple[int, ...]) -> None:
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = torch.rand(*shape)
    z = normalize(x, mean, std)
    assert torch.allclose(z[..., 1, :, :], (x[..., 1, :, :] - mean[1]) / std[1])
    assert torch.allclose(denormalize(z, mean, std), x, atol=1e-6)
    assert torch.allclose(denormalize(z, torch.tensor(mean), torch.tensor(std)), x, atol=1e-6)


def _labels() -> np.ndarray:
    return load_dataset(DataSpec(dataset="digits")).train_y.numpy()


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_cover_disjoint_and_reproducible(kind: str) -> None:
    y = _labels()
    spec = PartitionSpec(kind=kind, alpha=0.3)
    parts = partition_indices(y, 10, spec, seed=1)
    assert len(parts) == 10 and all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) and np.array_equal(np.sort(joined), np.arange(len(y)))
    again = partition_indices(torch.from_numpy(y), 10, spec, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(y, 10, spec, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in partition_indices(np.arange(103) % 10, 10, PartitionSpec(kind="iid"), seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_tiny_data_gives_every_client_data() -> None:
    y = load_dataset(DataSpec(dataset="cifar10-mini")).train_y.numpy()  # 16 examples
    for seed in range(3):
        parts = partition_indices(y, 8, PartitionSpec(kind="dirichlet", alpha=0.1), seed=seed)
        assert all(len(p) >= 1 for p in parts)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(16))


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_limit_classes_per_client(per_client: int) -> None:
    y = _labels()
    spec = PartitionSpec(kind="shards", shards_per_client=per_client)
    parts = partition_indices(y, 20, spec, seed=0)
    assert all(1 <= len(np.unique(y[p])) <= per_client for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    again = partition_indices(y, 20, spec, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_errors() -> None:
    y = np.arange(16) % 4
    with pytest.raises(ScenarioError, match="federation.clients"):
        partition_indices(y, 17, PartitionSpec(), seed=0)
    with pytest.raises(ScenarioError, match="shards_per_client"):
        partition_indices(y, 2, PartitionSpec(kind="shards", shards_per_client=5), seed=0)
    with pytest.raises(ScenarioError, match="data.partition"):
        partition_indices(y, 16, PartitionSpec(kind="shards", shards_per_client=4), seed=0)


def test_partitions_scale_to_1000_clients() -> None:
    y = np.tile(np.arange(10), 500)  # the scale benchmark's shape: 5,000 labels, 1,000 clients
    for spec in (PartitionSpec(kind="iid"), PartitionSpec(kind="dirichlet"), PartitionSpec(kind="shards")):
        parts = partition_indices(y, 1000, spec, seed=0)
        assert len(parts) == 1000 and all(len(p) >= 1 for p in parts)
        assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)
