"""Which per-example-gradient machinery a DP-SGD round runs (``grad_sample_mode``), and ``auto``'s choice.

Every mode releases the same mechanism: each example's gradient clipped to C (Opacus flat clipping), summed, plus
N(0, sigma^2 C^2), divided by the expected batch size; so the accountant, hence epsilon, never depends on it. Modes
differ in speed and memory, and their results agree to float rounding only (not bit for bit):

* ``hooks``, ``functorch``, ``ew``: Opacus per-example gradients (B x the model's size), then clipping;
* ``ghost``: Opacus ghost clipping (Li et al. ICLR 2022): norms without per-example gradients, then a second
  backward pass on the clip-weighted loss;
* ``bk``: book-keeping (Bu et al. ICML 2023, :mod:`fedsim.defenses.bk_clipping`): norms and the clipped sum from
  ONE backward pass that computes no weight gradient.

``auto`` (the default) is a cost model from the model's structure, never a timing: the same scenario picks the same
mode in every process and on every backend, so the same seed gives the same numbers. Calibrated on
``benchmarks/dp_overhead.py`` (one CPU thread, every shipped model; table in the module doc there): ``bk`` was the
fastest mode on every model it can run (all of whose trainable parameters sit in Linear, Conv2d, Embedding,
LayerNorm or GroupNorm layers, each called once per forward, and whose loss gives per-example values); elsewhere
``hooks`` (e.g. the ViT's class token and position embedding), as before ``auto`` existed. Under an example-level
audit ``auto`` takes ``hooks``: the canaries then go through the mechanism's own per-example clipping, which the
audit is meant to test (with ``ghost`` or ``bk`` they join the clipped sum; :mod:`fedsim.audit.inject`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from fedsim.defenses.bk_clipping import BookKeeping, brute_force_clipped_sum, unsupported_layer
from fedsim.errors import IncompatibleDefenseError
from fedsim.models.base import zero_inputs
from fedsim.models.layers import MaskDropout
from fedsim.run_caches import per_run_cache

#: modes whose clipping works on explicit per-example gradients (``p.grad_sample``)
PER_EXAMPLE_GRADIENT_MODES = ("hooks", "functorch", "ew")
#: modes that need the loss per example (the job's loss taking ``reduction="none"``)
PER_EXAMPLE_LOSS_MODES = ("ghost", "bk")


def takes_reduction(loss_fn: Callable[..., Tensor]) -> bool:
    """Whether ``loss_fn`` accepts ``reduction=`` (cross-entropy and fedsim's task losses do)."""
    if loss_fn is F.cross_entropy:
        return True
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    return "reduction" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def bk_problem(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why book-keeping clipping cannot train ``model`` on inputs of ``input_shape``, or None.

    Structural (:func:`~fedsim.defenses.bk_clipping.unsupported_layer`), then numerical: on a copy, two seeded random
    examples' clipped sum and norms from :class:`BookKeeping` must match autograd's, one example at a time
    (catches a weight used outside its layer, or a layer run twice). Deterministic; the global RNG (CPU and the
    model's CUDA device) is untouched and ``model`` is left as it was. The probe runs once per process and run for
    each architecture (:func:`_architecture`): the answer is cached, emptied with
    :func:`fedsim.run_caches.clear_run_caches` so every benchmark cell pays it alike."""
    key = (_architecture(model), tuple(input_shape))
    cache = _bk_problems()
    if key not in cache:
        cache[key] = _probe_bk(model, input_shape)
    return cache[key]


@per_run_cache
def _bk_problems() -> dict[tuple, str | None]:
    """:func:`bk_problem`'s answers in this process, by (architecture, input shape)."""
    return {}


def _architecture(model: nn.Module) -> tuple:
    """What the probe's answer depends on: the module tree (classes and settings), every parameter's name, shape,
    dtype and trainability, and the device type."""
    device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else "cpu"
    return (f"{type(model).__module__}.{type(model).__qualname__}", repr(model), device,
            tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()))


def _probe_bk(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """:func:`bk_problem`, uncached.

    Like with like: the per-example reference and the batched pass must see the same function, so randomness in
    training mode is switched off on the copy: every dropout layer (torch's ``nn.Dropout`` family, fedsim's
    :class:`~fedsim.models.MaskDropout`, masks cleared) goes to eval mode, the rest stays in training mode. If two
    forward passes under different seeds still differ (e.g. ``F.dropout(training=self.training)`` in a forward),
    the whole copy goes to eval mode; if they still differ, bk cannot be checked and is refused. Training itself
    keeps its dropout: each example's mask reaches only that example's gradient, which bk computes exactly."""
    problem = unsupported_layer(model)
    if problem is not None:
        return f"params.grad_sample_mode: bk cannot clip this model ({problem}); use grad_sample_mode: hooks"
    probe = copy.deepcopy(model).train()
    for m in probe.modules():
        if isinstance(m, (_DropoutNd, MaskDropout)):
            m.eval()
            if isinstance(m, MaskDropout):
                m.set_mask(None)
    device = next(probe.parameters()).device
    bk = None
    try:
        with torch.random.fork_rng(devices=[_cuda_index(device)] if device.type == "cuda" else []):
            _seed(device, 0)
            x = zero_inputs(probe, input_shape)
            x = torch.randint(0, probe.vocab_size, x.shape) if x.dtype == torch.long else torch.randn(x.shape)
            x = x.to(device)  # drawn on the CPU: the same examples on any device
            if _random_forward(probe, x, device):
                probe.eval()
                if _random_forward(probe, x, device):
                    return ("params.grad_sample_mode: bk cannot be checked on this model: its forward pass is random "
                            "even in eval mode (a stochastic layer); use grad_sample_mode: hooks")
            logits = probe(x)
            y = (x if logits.dim() == 3 else torch.zeros(2, dtype=torch.long, device=device))

            def per_example(out: Tensor, target: Tensor) -> Tensor:
                if out.dim() == 3:
                    return out.float().pow(2).flatten(1).mean(1)
                return F.cross_entropy(out, target, reduction="none")

            ref, ref_norms = brute_force_clipped_sum(probe, per_example, x, y, 1e-3)
            bk = BookKeeping(probe, 1e-3)
            for p in probe.parameters():
                p.grad = None
            norms = bk.clip_backward(per_example(probe(x), y))
        params = [p for p in probe.parameters() if p.requires_grad]
        worst = max(float((p.grad - r).abs().max()) if p.grad is not None else float(r.abs().max())
                    for p, r in zip(params, ref, strict=True))
        scale = max(float(r.abs().max()) for r in ref) or 1.0
        if worst > 1e-3 * scale or not torch.allclose(norms.double().cpu(), ref_norms.double(), rtol=1e-3, atol=1e-6):
            return ("params.grad_sample_mode: bk's clipped gradient differs from the per-example one on this model "
                    "(a weight used outside its layer?); use grad_sample_mode: hooks")
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"params.grad_sample_mode: bk cannot clip this model ({type(err).__name__}: {first})"
    finally:
        if bk is not None:
            bk.cleanup()
    return None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _seed(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and ``device``'s (CUDA) only: ``torch.manual_seed`` would seed every CUDA device, and
    queue a seed for a CUDA not yet initialized, outside what the probe's ``fork_rng`` restores."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[_cuda_index(device)].manual_seed(seed)


def _random_forward(probe: nn.Module, x: Tensor, device: torch.device) -> bool:
    """Whether two forward passes of ``probe`` on ``x`` under different seeds differ (a live stochastic layer)."""
    outs = []
    with torch.no_grad():
        for seed in (1, 2):
            _seed(device, seed)
            outs.append(probe(x).float())
    return not torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def choose_mode(model: nn.Module, input_shape: tuple[int, ...] | None, loss_fn: Callable[..., Tensor],
                audited: bool) -> str:
    """``auto``'s mode for ``model`` (already transformed for Opacus) on inputs of ``input_shape`` (None: unknown)
    trained with ``loss_fn``: ``bk`` when it can run (:func:`bk_problem`; the loss takes ``reduction=``), not under an
    example-level audit (``audited``), else ``hooks``. Module doc: the calibration."""
    if audited or input_shape is None or not takes_reduction(loss_fn):
        return "hooks"
    return "bk" if bk_problem(model, input_shape) is None else "hooks"


def prepare_hooks(model: nn.Module, mode: str, max_grad_norm: float) -> Any:
    """The per-example machinery of ``mode`` on ``model``: Opacus's ``prepare_module`` (``ew``: a wrapper module;
    else a hooks object) or a :class:`BookKeeping`; each with ``enable_hooks``/``disable_hooks``, and ``cleanup``
    where hooks must be removed."""
    if mode == "bk":
        return BookKeeping(model, max_grad_norm)
    from opacus.grad_sample.utils import prepare_module

    extra = {"max_grad_norm": max_grad_norm} if mode == "ghost" else {}
    return prepare_module(model, mode, wrap_model=mode == "ew", batch_first=True, loss_reduction="mean", **extra)


class BKLoss:
    """The loss a ``bk`` round's training loop sees: ``backward()`` runs :meth:`BookKeeping.clip_backward` on the
    per-example losses (B,), leaving the clipped sum in ``p.grad``; ``item()`` is their mean, as the job's loss."""

    def __init__(self, bk: BookKeeping, loss_per_example: Tensor) -> None:
        self.bk, self.loss_per_example = bk, loss_per_example

    def detach(self) -> Tensor:
        return self.loss_per_example.detach().mean()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        self.bk.clip_backward(self.loss_per_example)


def resolve_mode(defense: Any, model: nn.Module, loss_fn: Callable[..., Tensor]) -> str:
    """The mode ``defense`` (a DP-SGD-family defense) runs on ``model`` (transformed) trained with ``loss_fn``: its
    ``params.grad_sample_mode``, or for ``auto`` :func:`choose_mode`'s (its probe cached per process and run by
    architecture: :func:`bk_problem`). Deterministic: never a timing, so every process and backend agrees.

    The input shape is the scenario's data (loaded already when clients train), else what ``check_model`` last saw
    (``defense.input_shape``); unknown: ``hooks``."""
    requested = defense.params.grad_sample_mode
    if requested != "auto":
        return requested
    shape, audited = getattr(defense, "input_shape", None), False
    if defense.scenario is not None:
        from fedsim.audit.inject import canaries_at
        from fedsim.simulation.setup import setup_for

        shape = tuple(int(d) for d in setup_for(defense.scenario).data.input_shape)
        audited = defense.audits_examples and canaries_at(defense.scenario, "example") is not None
    return choose_mode(model, shape, loss_fn, audited)


def dp_optimizer(mode: str, base: torch.optim.Optimizer, **kwargs: Any) -> Any:
    """The DP optimizer of a round in ``mode`` around ``base`` (``kwargs``: Opacus's noise_multiplier,
    max_grad_norm, expected_batch_size, loss_reduction, generator): Opacus's flat-clipping one for ``mode``; bk
    leaves the clipped sum in ``p.grad``, as ghost clipping does: the same noise-and-scale optimizer, leaner
    (:func:`bk_optimizer_class`)."""
    from opacus.optimizers import get_optimizer_class

    cls = bk_optimizer_class() if mode == "bk" else get_optimizer_class(clipping="flat", distributed=False,
                                                                         grad_sample_mode=mode)
    return cls(base, **kwargs)


def mode_loss(mode: str, hooks: Any, optimizer: Any, base_loss: Callable[..., Tensor]) -> Callable[..., Any] | None:
    """The loss ``(logits, labels)`` a round in ``mode`` trains with, or None for the job's own ``base_loss``:
    ghost: Opacus's ``DPLossFastGradientClipping`` (``hooks`` from :func:`prepare_hooks`, ``optimizer`` from
    :func:`dp_optimizer`); bk: a :class:`BKLoss` of the per-example losses."""
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        return DPLossFastGradientClipping(hooks, optimizer, ReducibleLoss(base_loss), "mean")
    if mode == "bk":
        per_example = ReducibleLoss(base_loss, "none", mode)
        return lambda logits, labels: BKLoss(hooks, per_example(logits, labels))
    return None


class ReducibleLoss(nn.Module):
    """The job's ``loss_fn(logits, labels)`` with the ``reduction`` attribute ghost clipping toggles (bk: "none")."""

    def __init__(self, loss_fn: Callable[..., Tensor], reduction: str = "mean", mode: str = "ghost") -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.mode = mode

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        try:
            return self.loss_fn(logits, labels, reduction=self.reduction)
        except TypeError as err:
            raise IncompatibleDefenseError(
                f"dp_sgd grad_sample_mode {self.mode!r} needs a per-example loss (a loss_fn taking reduction=); "
                "use grad_sample_mode 'hooks' with this loss"
            ) from err


def bk_optimizer_class() -> type:
    """Opacus's ``DPOptimizerFastGradientClipping`` (``p.grad`` holds the clipped sum; add noise, scale), without
    its per-step copies: the clipped sum is kept by reference (Opacus deep-copies it), and the noise is drawn with
    the same ``torch.normal`` call in the same order (Opacus also allocates a zero tensor per parameter first) and the
    sum formed in the noise's buffer. The released gradient is bit-for-bit Opacus's; a step costs two passes over
    the parameters fewer (the MLP's 2.1 M weights: measured in ``benchmarks/dp_overhead.py``)."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class LeanDPOptimizer(DPOptimizerFastGradientClipping):
        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad.data)
                else:
                    p.summed_grad = p.grad.data  # add_noise replaces p.grad, so this stays the clipped sum

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            if std == 0 or self.secure_mode:
                return super().add_noise()  # Opacus's own path (zeros, or its secure sampler)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = torch.normal(mean=0, std=std, size=p.summed_grad.shape, device=p.summed_grad.device,
                                     generator=self.generator, dtype=p.summed_grad.dtype)
                p.grad = noise.add_(p.summed_grad).view_as(p)
                _mark_as_processed(p.summed_grad)

    return LeanDPOptimizer
