"""FedLeak (Fan, Wang, Chen, Zhou: "Boosting Gradient Leakage Attacks: Data Reconstruction in Realistic FL
Settings", USENIX Security 2025, arXiv 2506.08435): partial gradient matching plus gradient regularization.

**Sources.** The paper's body (its equations and its "practical evaluation protocol") could not be read here: only
its abstract (arxiv.org/abs/2506.08435) and a third-party summary. The procedure below follows the authors' released
code (Zenodo record 10.5281/zenodo.15532455), read as copied, with the original lines marked, in the public
repository ``KaimingZhu/FedLeak_transfer_test`` (``generator.py``: ``FedLeak``; ``attack.py``: ``combine_loss``).
Tags: [code] = as in that released code; [fedsim] = fedsim's choice where the code is silent or cannot apply.

**Partial gradient matching** [code]. For every parameter tensor ``l`` of the observed gradient ``g*_l``, only the
entries whose magnitude is at or above the tensor's ``1 - keep`` quantile are matched (``keep`` 0.5: the median of
``|g*_l|``, linear interpolation as ``torch.quantile``): mask ``M_l = [|g*_l| >= q_l]``, applied to both the dummy
gradient ``g_l`` and ``g*_l``. The distance, summed over all tensors (no layer is dropped: the code's top-k-layers
selection is commented out), is

    D = sum_l  mean(|M_l (g_l - g*_l)|)  +  (1 - <M_l g_l, M_l g*_l> / ((|M_l g_l| + 1e-8) (|M_l g*_l| + 1e-8)))

(an L1 mean over all the tensor's entries plus a per-tensor cosine distance; the code writes ``-cos``, fedsim
``1 - cos``: the same gradients, a non-negative loss. The code's second 20%-quantile mask inside its cosine keeps
every entry the first mask kept, so it is left out.) ``distance: cosine`` keeps only the cosine term [fedsim].

**Gradient regularization** [code]. The code's approximation (the paper's exact regularizer could not be read;
the third-party summary says it "penalizes the gradients of the dummy data") is a look-ahead: at each iteration take
the sign of the gradient of ``D + tv * TV`` w.r.t. the optimized weights, ``s0``; make an optimizer step with it;
take the signed gradient there, ``s1``; restore the weights and step with ``(1 - lookahead) s0 + lookahead s1``
(``lookahead`` 0.3). Both steps update AdamW's moments, as in the code. This is the finite-difference form of a
gradient-norm penalty (Zhao, Zhang, Hu, ICML 2022) [fedsim's reading, uncertain]; ``lookahead: 0`` switches it off.

**Image parameterization** [code]. The images are the output of an *untrained* convolutional generator (a deep
image prior: no training data), ``x = sigmoid(G_w(z))`` with one fixed ``z ~ N(0, I_128)`` per image, and the
generator's weights ``w`` are optimized: a 4x4 transposed convolution, then blocks of two (spectral-normalized 3x3
convolution, BatchNorm, LeakyReLU 0.1) with nearest 2x upsampling between them, up to the image size (the code's
smallest output is 32 pixels; fedsim stops at the first size that covers the image), a 1x1 convolution to the
channels. AdamW (lr 0.01, weight decay 0.01) on the sign of the gradient, cosine annealing to 0 over
``iterations + 1`` steps, TV weight 1e-5 on the pixel-space images, and a 5x5 median filter on the final images. The
code's generator is 256 channels wide and runs 10,000 iterations on a GPU; fedsim's default ``width`` is 32 [fedsim:
CPU budget]. The code filters its 128-pixel images; fedsim's ``median: auto`` filters images of at least 32 pixels
only [fedsim]: a 5x5 window spans most of an 8x8 digit (measured on a batch of 8 digits, one FedAvg step, MLP, 200
iterations: 10.2 dB filtered, 26.8 dB unfiltered; on 2 CIFAR images the filter gained 0.3 dB). Channels halve at 64
and 128 pixels as in the code. For a size that is not a power of two times 4 the generator draws the next larger one
and resizes bilinearly (as the 224-pixel adaptation in that repository does).

**The released example** runs it on an untrained ResNet-18 whose ReLUs are replaced by sigmoids, one FedSGD gradient
of 16 ImageNet images at 128 pixels, with the true labels; the paper's own settings could not be read.
**Labels** [fedsim]. The released code is handed the true labels (its inference line is commented out); fedsim uses
the granted labels (``knowledge.labels: known``) or infers them from the update (``label_strategy``).
**Restarts** [fedsim]. The code keeps, per image, the restart with the best PSNR *against the ground truth*; fedsim
ranks restarts by the final matching loss alone (:mod:`fedsim.attacks.restarts`), in full or by
successive halving on it (``schedule``, :mod:`fedsim.attacks.schedule`).
**FedAvg** [fedsim]. Nothing in the released code handles several local steps, and the paper's protocol could not
be read. A FedAvg update is read as one gradient, as Inverting Gradients does: the cosine term is scale invariant;
the L1 term needs ``-delta / (lr * steps)`` (:func:`fedsim.attacks.matching.matching_target`), so a FedAvg scenario must
grant ``knowledge.local_hparams`` (SoK letter C) unless ``distance: cosine``. Exact for one local step only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.inverting_gradients import from_pixels, gradient_distance
from fedsim.attacks.matching import (
    DeltaScaled,
    LabelStrategy,
    examples_to_reconstruct,
    labels_for,
    matching_target,
    unusable,
)
from fedsim.attacks.objectives import Distance
from fedsim.attacks.regularizers import total_variation
from fedsim.attacks.restarts import NON_FINITE, TIME_LIMIT, RestartBook, past
from fedsim.attacks.schedule import (
    SCHEDULE_HELP,
    OnStep,
    ScheduleSpec,
    Sequential,
    Steps,
    planned_iterations,
    run_schedule,
    rungs,
)
from fedsim.attacks.victim import victim_model
from fedsim.errors import FedsimError
from fedsim.seeding import derive_seed, torch_generator
from fedsim.threat import ClientUpdate, Reconstruction

#: ``median: auto`` filters (5x5, the released code's) only images whose smaller side has at least this many pixels.
MEDIAN_MIN_SIZE = 32


def median_size(median: int | str, shape: Sequence[int]) -> int:
    """The median filter's window for ``params.median`` on images of ``shape`` (C, H, W): ``auto`` is 5 when
    ``min(H, W) >= MEDIAN_MIN_SIZE``, else 0 (module docstring); an int is used as given."""
    if median == "auto":
        return 5 if min(shape[-2:]) >= MEDIAN_MIN_SIZE else 0
    return int(median)


def partial_threshold(target: Tensor, keep: float) -> Tensor:
    """The ``1 - keep`` quantile of ``|target|`` over all its entries (linear interpolation between order
    statistics, as ``torch.quantile``, without its size limit): entries at or above it are matched."""
    values = target.detach().abs().flatten().sort().values
    pos = (1.0 - keep) * (values.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, values.numel() - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def partial_masks(target: Sequence[Tensor], keep: float) -> list[Tensor]:
    """Per tensor of the observed gradient, the float mask (same shape) of the entries FedLeak matches:
    ``|g*| >= partial_threshold(g*, keep)``; ``keep`` 1 matches every entry. Empty tensors get empty masks."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return [(t.abs() >= partial_threshold(t, keep)).to(t.dtype) if t.numel() else torch.ones_like(t) for t in target]


def partial_distance(masks: Sequence[Tensor], l1: bool = True, eps: float = 1e-8) -> Distance:
    """FedLeak's distance over the masked entries (module docstring): per tensor the L1 mean (when ``l1``) plus
    ``1 - cosine`` of the masked gradients, summed over tensors. ``masks`` come from :func:`partial_masks` on the
    same target; the result is a :data:`fedsim.attacks.objectives.Distance` ``(dummy, target) -> scalar``."""

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        if len(dummy) != len(target) or len(dummy) != len(masks) or not dummy:
            raise ValueError(f"gradient lists differ in length or are empty ({len(dummy)}, {len(target)}, "
                             f"{len(masks)} masks)")
        total = dummy[0].new_zeros(())
        for g, t, m in zip(dummy, target, masks, strict=True):
            if not t.numel():
                continue
            gm, tm = g * m, t * m
            if l1:
                total = total + (gm - tm).abs().mean()
            total = total + 1.0 - (gm * tm).sum() / ((gm.norm() + eps) * (tm.norm() + eps))
        return total

    return distance


class _Block(nn.Sequential):
    """Two (spectral-normalized 3x3 convolution, BatchNorm, LeakyReLU 0.1), the released code's ``ConvBlock``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1)), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
                         spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1)), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.1))


@dataclass
class Drawn:
    """One restart's state: its generator and codes, the steps taken, why it stopped early, and the images it drew
    when last scored (pixel space, (B, C, H, W))."""

    gen: nn.Module
    z: Tensor
    steps: int
    stopped: str | None = None
    pixels: Tensor | None = None


class PriorGenerator(nn.Module):
    """The untrained generator FedLeak optimizes (module docstring): ``(N, latent)`` codes to ``(N, C, H, W)`` images
    in (0, 1). ``width`` channels up to 32 pixels, halved at 64 and again at 128 and above."""

    def __init__(self, shape: tuple[int, int, int], width: int, latent: int) -> None:
        super().__init__()
        channels, height, wide = shape
        self.size, self.latent = (height, wide), latent
        self.stem = nn.Sequential(nn.ConvTranspose2d(latent, width, 4, 1, 0), nn.BatchNorm2d(width), nn.LeakyReLU(0.1),
                                  _Block(width, width))
        blocks, res, ch = [], 4, width
        while res < max(height, wide):
            res *= 2
            out = width if res <= 32 else width // 2 if res == 64 else width // 4
            blocks.append(_Block(ch, max(out, 1)))
            ch = max(out, 1)
        self.blocks = nn.ModuleList(blocks)
        self.to_image = nn.Conv2d(ch, channels, 1)
        self.res = res

    def forward(self, z: Tensor) -> Tensor:
        h = self.stem(z.view(-1, self.latent, 1, 1))
        for block in self.blocks:
            h = block(F.interpolate(h, scale_factor=2))
        x = torch.sigmoid(self.to_image(h))
        if (self.res, self.res) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


def median_filter(x: Tensor, k: int) -> Tensor:
    """Per-channel ``k x k`` median of images ``x`` (N, C, H, W) with reflected borders (the code's ``MedianPool2d``,
    stride 1); ``k <= 1`` returns ``x``. A border wider than the image falls back to replicated padding."""
    if k <= 1:
        return x
    pad = k // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    padded = F.pad(x, (pad, k - 1 - pad, pad, k - 1 - pad), mode=mode)
    windows = padded.unfold(2, k, 1).unfold(3, k, 1)
    return windows.contiguous().flatten(-2).median(dim=-1).values


@register_attack("fedleak")
class FedLeak(DeltaScaled, Attack):
    """Partial gradient matching with a look-ahead gradient regularization over an untrained generator's images."""

    summary = "FedLeak (Fan et al. 2025): partial gradient matching + look-ahead gradient regularization"
    matches_differences = True  # dummy messages via gradient_distance (fedsim.attacks.differences)
    #: As Inverting Gradients (the SoK's B): the model, the loss and the number of examples; C when the L1 term
    #: rescales a FedAvg delta by the granted local hyperparameters
    #: (:func:`fedsim.attacks.matching.delta_scale_letter`).
    threat_model = "B"
    assumes = ("natural images are what an untrained convolutional generator draws easily (a deep image prior; "
               "no auxiliary data)",
               "FedAvg: the update is read as one gradient (exact for one local step)")

    class Params(AttackParams):
        keep: float = Field(0.5, gt=0, le=1, description="share of each gradient tensor's entries matched, the "
                            "largest in |observed gradient| (released code: 0.5, at or above the median)")
        distance: Literal["l1_cosine", "cosine"] = Field(
            "l1_cosine", description="per-tensor L1 mean + cosine distance (code), or the cosine term only")
        lookahead: float = Field(0.3, ge=0, lt=1, description="weight of the look-ahead signed gradient (code: 0.3; "
                                 "0: no gradient regularization)")
        lr: float = Field(0.01, gt=0, description="AdamW step size on the generator's weights")
        weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (PyTorch's default, as the code)")
        tv: float = Field(1e-5, ge=0, description="weight of the mean-form total variation of the pixel images")
        width: int = Field(32, ge=4, le=512, description="generator channels (released code: 256)")
        latent: int = Field(128, ge=1, le=1024, description="length of each image's fixed code z")
        median: Literal["auto"] | Annotated[int, Field(ge=0, le=15)] = Field(
            "auto", description="median filter size on the final images (0/1: none); auto: the code's 5 on images of "
            f"at least {MEDIAN_MIN_SIZE} pixels, none on smaller ones")
        label_strategy: LabelStrategy = Field("auto", description="label inference when labels are not known")
        schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description=SCHEDULE_HELP)

        @field_validator("median", mode="before")
        @classmethod
        def _median_form(cls, value: object) -> object:
            """One reason naming both accepted forms (pydantic's union error names only the first)."""
            if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 15):
                return value
            raise ValueError(f"'auto' or an integer 0-15 (the filter window; 0/1: none), not {value!r}")


    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        start = time.perf_counter()
        reason = unusable(update, self.budget)
        if reason is not None:
            return Reconstruction.failure(reason)
        shape = tuple(int(s) for s in update.task.input_shape)
        if len(shape) != 3:
            return Reconstruction.failure(f"fedleak draws images (C, H, W), but the task's inputs have shape {shape}")
        p, budget = self.params, self.budget
        num = examples_to_reconstruct(update)
        try:
            model = victim_model(update, self.device)
            target = matching_target(update, model, rescale=p.distance != "cosine")
            labels = labels_for(update, num, known=self.knowledge.labels == "known", strategy=p.label_strategy,
                                model=model).to(self.device)
            masks = partial_masks(target, p.keep)
        except (FedsimError, ValueError, RuntimeError) as err:
            return Reconstruction.failure(str(err))
        distance = partial_distance(masks, l1=p.distance == "l1_cosine")
        mean, std = update.task.mean, update.task.std

        def loss_fn(pixels: Tensor, create_graph: bool = True) -> Tensor:
            loss = gradient_distance(model, from_pixels(pixels, mean, std), labels, target, distance, create_graph)
            return loss + p.tv * total_variation(pixels) if p.tv > 0 else loss

        deadline = None if budget.time_limit_s is None else start + budget.time_limit_s
        book: RestartBook[Drawn] = RestartBook()

        def start_restart(restart: int, on_step: OnStep) -> Steps[Drawn]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "fedleak-generator", restart))
                gen = PriorGenerator((shape[0], shape[1], shape[2]), p.width, p.latent)
            gen = gen.to(self.device).train()
            z = torch.randn((num, p.latent), generator=torch_generator(self.seed, "fedleak-z", restart)).to(self.device)
            return self._optimize(gen, z, loss_fn, deadline, on_step)

        def score(_restart: int, drawn: Drawn) -> float:
            """The matching loss of the images the generator draws now. The forward pass runs in train mode (as
            the optimization's), whose spectral-norm power iteration and BatchNorm statistics update buffers:
            they are put back, so a restart scored at a rung goes on exactly as if it had not been."""
            saved = {k: v.clone() for k, v in drawn.gen.state_dict().items()}
            with torch.no_grad():
                drawn.pixels = drawn.gen(drawn.z).detach()
            drawn.gen.load_state_dict(saved)
            return loss_fn(drawn.pixels, False).item()

        cohort = Sequential(start_restart, score, lambda drawn: drawn.stopped, iterations=budget.iterations,
                            deadline=deadline, progress=progress,
                            planned=planned_iterations(rungs(p.schedule, budget.restarts, budget.iterations)))
        try:
            schedule = run_schedule(p.schedule, cohort, budget.restarts, budget.iterations, book)
        except (RuntimeError, ValueError, IndexError) as err:  # shapes inside the model, memory, ...
            return Reconstruction.failure(f"optimization failed: {err}")
        seconds = time.perf_counter() - start
        if book.best is None or book.best.pixels is None:
            return book.failure(seconds)
        best, steps = book.best.pixels, book.best.steps
        images = median_filter(best, median_size(p.median, shape)).clamp(0, 1).cpu()
        kept = sum(float(m.sum()) for m in masks) / max(sum(m.numel() for m in masks), 1)
        stats = {**book.stats(), **schedule, "iterations": float(steps), "matched_share": kept, "seconds": seconds}
        return Reconstruction(images=images, labels=labels.cpu(), stats=stats)

    def _optimize(self, gen: PriorGenerator, z: Tensor, loss_fn: Callable[[Tensor], Tensor], deadline: float | None,
                  on_step: Callable[[int], None]) -> Steps[Drawn]:
        """Signed AdamW with the look-ahead on ``gen``'s weights (module docstring), one step at a time (the restart
        protocol of :mod:`fedsim.attacks.schedule`); the result says the steps taken and why it stopped early
        (:data:`fedsim.attacks.restarts.TIME_LIMIT`, :data:`~fedsim.attacks.restarts.NON_FINITE`) or None."""
        p, iterations = self.params, self.budget.iterations
        weights = [w for w in gen.parameters() if w.requires_grad]
        opt = torch.optim.AdamW(weights, lr=p.lr, weight_decay=p.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations + 1)

        def signed_gradient() -> list[Tensor] | None:
            loss = loss_fn(gen(z))
            if not torch.isfinite(loss):
                return None
            return [g.sign() for g in torch.autograd.grad(loss, weights)]

        def step(grads: Sequence[Tensor]) -> None:
            for w, g in zip(weights, grads, strict=True):
                w.grad = g
            opt.step()

        for i in range(iterations):
            if past(deadline):
                return Drawn(gen, z, i, TIME_LIMIT)
            s0 = signed_gradient()
            if s0 is None:
                return Drawn(gen, z, i, NON_FINITE)
            if p.lookahead > 0:
                saved = [w.detach().clone() for w in weights]
                step(s0)
                s1 = signed_gradient()
                if s1 is None:
                    return Drawn(gen, z, i, NON_FINITE)
                with torch.no_grad():
                    for w, old in zip(weights, saved, strict=True):
                        w.copy_(old)
                s0 = [(1 - p.lookahead) * a + p.lookahead * b for a, b in zip(s0, s1, strict=True)]
            step(s0)
            sched.step()
            on_step(i + 1)
            yield i + 1, Drawn(gen, z, i + 1)
        return Drawn(gen, z, iterations)
