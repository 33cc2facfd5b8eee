"""fedsim: privacy attacks and defenses in simulated federated learning (Flower + Ray + PyTorch)."""

__version__ = "0.1.0"
