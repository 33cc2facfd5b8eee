"""fedsim: privacy attacks and defenses in simulated federated learning (Flower + Ray + PyTorch)."""

from pathlib import Path as _Path

from fedsim import _source_layout

__version__ = "0.2.0"

_source_layout.install(_Path(__file__).resolve().parent)
