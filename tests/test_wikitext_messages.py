"""WikiText-2's absent-data and failed-download errors name the field (``data.dataset``) and, when the download was
already on and failed, never tell the user to set ``data.download: true`` (QA: the failure said so)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.data import load_dataset
from fedsim.errors import DataUnavailableError
from fedsim.scenario import DataSpec


def test_a_failed_download_says_check_the_network_not_set_download(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(DataSpec(dataset="wikitext-2", root=str(tmp_path), download=True))
    message = str(err.value)
    assert message.startswith("data.dataset: ") and "\n" not in message, message
    assert "data.download: true" not in message and "check the network" in message, message
    assert "Couldn't reach" in message and "data.root" in message, message


def test_absent_data_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(DataSpec(dataset="wikitext-2", root=str(tmp_path / "none"), download=False))
    assert str(err.value).startswith("data.dataset: "), str(err.value)
