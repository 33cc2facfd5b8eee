"""The prior-training schema: a YAML file -> a validated, frozen :class:`PriorConfig`.

Mirrors :mod:`fedsim.scenario`: unknown keys and bad values raise a
:class:`~fedsim.errors.ScenarioError` naming the YAML field path (``training.lr_g``), and
``--set key.path=value`` overrides are applied before validation. The auxiliary data is an index
range of one split of a registered dataset, so that it can be kept disjoint from the clients' data
(GIFD, Fang et al. ICCV 2023, assumes the attacker's generator was trained on public data, not on
the victims' images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedsim.errors import ScenarioError
from fedsim.scenario import _first_error, _PathError, _Strict, apply_overrides, path_component, read_yaml


class PriorDataSpec(_Strict):
    """Which images the prior learns from: ``split`` examples ``start .. stop-1`` of ``dataset``."""

    dataset: str = "mnist-5k"
    split: Literal["train", "test"] = "train"
    start: int = Field(0, ge=0, description="first example (inclusive) of the split")
    stop: int | None = Field(None, ge=1, description="last example (exclusive); default: the end of the split")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held out when the dataset has no test split")
    root: str | None = Field(None, description="folder of torchvision datasets")
    download: bool = False

    @model_validator(mode="after")
    def _check_range(self) -> PriorDataSpec:
        if self.stop is not None and self.stop <= self.start:
            raise _PathError("stop", f"stop ({self.stop}) must be greater than start ({self.start})")
        return self


class PriorModelSpec(_Strict):
    """Generator/discriminator size (see :class:`fedsim.priors.generator.DCGANGenerator`)."""

    latent_dim: int = Field(64, ge=1)
    width: int = Field(32, ge=2, description="even; the generator's widest conv has this many channels")
    resolution: int | None = Field(None, ge=8, description="default: the dataset's image size; a multiple of 4")

    @model_validator(mode="after")
    def _check_sizes(self) -> PriorModelSpec:
        if self.width % 2:
            raise _PathError("width", f"must be even, got {self.width}")
        if self.resolution is not None and self.resolution % 4:
            raise _PathError("resolution", f"must be a multiple of 4, got {self.resolution}")
        return self


class PriorTrainingSpec(_Strict):
    """DCGAN training (Radford et al., ICLR 2016): Adam with betas (0.5, 0.999), lr 2e-4, BCE losses."""

    steps: int = Field(3000, ge=1, description="generator (and discriminator) updates")
    batch_size: int = Field(64, ge=2, description="real images per discriminator step (BatchNorm needs 2+)")
    lr_g: float = Field(2e-4, gt=0)
    lr_d: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="one-sided: real target = 1 - this")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")

    @model_validator(mode="after")
    def _check_betas(self) -> PriorTrainingSpec:
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise _PathError(f"betas[{i}]", f"must be in [0, 1), got {beta}")
        return self


class PriorConfig(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    data: PriorDataSpec = PriorDataSpec()
    model: PriorModelSpec = PriorModelSpec()
    training: PriorTrainingSpec = PriorTrainingSpec()
    output: str | None = Field(None, description="the prior file to write; default priors/NAME.pt")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:  # the default output is priors/NAME.pt
        return path_component(value)

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else Path("priors") / f"{self.name}.pt"


def parse_prior_config(raw: Any) -> PriorConfig:
    """Validate a raw mapping (parsed YAML) and check the dataset name against the registry."""
    from fedsim.data import DATASETS

    if not isinstance(raw, dict):
        raise ScenarioError("", "a prior config must be a YAML mapping")
    try:
        config = PriorConfig.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None
    if config.data.dataset not in DATASETS:
        raise ScenarioError("data.dataset", f"unknown dataset {config.data.dataset!r} (known: {', '.join(DATASETS)})")
    return config


def load_prior_config(path: str | Path, overrides: list[str] | None = None) -> PriorConfig:
    """Read, override (``key.path=value``) and validate a prior-training YAML file."""
    raw = read_yaml(path, "prior config file")
    return parse_prior_config(apply_overrides(raw if raw is not None else {}, list(overrides or [])))
