"""Train a DCGAN prior (Radford, Metz, Chintala, ICLR 2016) on auxiliary images, resumably.

Standard DCGAN training: weights from N(0, 0.02) (BatchNorm scales from N(1, 0.02)), Adam with
betas (0.5, 0.999), and per step one discriminator update on a real and a fake batch
(BCE-with-logits, optional one-sided label smoothing, Salimans et al. 2016) followed by one
generator update with the non-saturating loss -log D(G(z)).

Reproducible and resumable: step ``t`` draws its real batch and its latents from a generator seeded
by ``derive_seed(seed, "prior-step", t)``, so there is no RNG stream to carry across a restart;
every ``checkpoint_every`` steps the weights and both optimisers' states are written atomically to
``<out>.ckpt``, and a rerun continues from there. Same config, seed and torch thread count ->
bit-identical weights, whether or not the run was interrupted. The finished prior is written
atomically to ``<out>`` and the checkpoint is then removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.priors.config import PriorConfig
from fedsim.priors.data import load_auxiliary_images
from fedsim.priors.generator import from_pixels
from fedsim.priors.store import (
    Prior,
    PriorMeta,
    build_prior,
    check_prior_target,
    load_prior,
    read_prior_file,
    save_prior,
)
from fedsim.seeding import torch_generator

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class PriorTrainingResult:
    path: Path
    prior: Prior
    steps: int  # total optimiser steps in the prior
    resumed_from: int  # step the run continued from (0: trained from scratch)
    seconds: float  # training wall time over all runs that built this prior
    losses: dict[str, float]  # of the last step (empty when nothing was left to train)


def checkpoint_path(out_path: str | Path) -> Path:
    """Where the resumable training state of ``out_path`` lives."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".ckpt")


def config_fingerprint(config: PriorConfig) -> dict[str, Any]:
    """The fields that determine the weights; a checkpoint is only resumed under the same ones."""
    return config.model_dump(mode="json", exclude={"description": True, "output": True,
                                                   "training": {"steps", "checkpoint_every"}})


def _init_dcgan(modules: list[nn.Module], gen: torch.Generator) -> None:
    """DCGAN init (Radford et al. 2016, sec. 4): conv/linear weights N(0, 0.02), BatchNorm N(1, 0.02), biases 0."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=gen)
                nn.init.zeros_(m.bias)


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if old == new else path


def _resume(ckpt: Path, config: PriorConfig, prior: Prior, optimisers: tuple[torch.optim.Optimizer, ...]
            ) -> tuple[int, float]:
    """Load a checkpoint into ``prior`` and the optimisers; (step reached, seconds spent so far)."""
    payload = read_prior_file(ckpt)
    state = payload.get("checkpoint")
    if not isinstance(state, dict):
        raise ScenarioError("output", f"{ckpt} holds no training state; delete it or pass --fresh")
    diff = _first_difference(state["config"], config_fingerprint(config))
    if diff is not None:
        raise ScenarioError(diff, f"differs from the checkpoint {ckpt} being resumed; restore the value, "
                                  "or delete the checkpoint / pass --fresh to start over")
    step = int(state["step"])
    if step > config.training.steps:
        raise ScenarioError("training.steps", f"{config.training.steps} is fewer than the {step} steps the "
                                              f"checkpoint {ckpt} already holds")
    prior.generator.load_state_dict(payload["generator"])
    prior.discriminator.load_state_dict(payload["discriminator"])
    for opt, key in zip(optimisers, ("opt_g", "opt_d"), strict=True):
        opt.load_state_dict(state[key])
    return step, float(state["seconds"])


def _save_checkpoint(ckpt: Path, config: PriorConfig, prior: Prior, optimisers: tuple[torch.optim.Optimizer, ...],
                     step: int, seconds: float) -> None:
    """Weights, optimiser states and progress; the file is also a usable (unfinished) prior."""
    state = {"step": step, "seconds": seconds, "config": config_fingerprint(config),
             "opt_g": optimisers[0].state_dict(), "opt_d": optimisers[1].state_dict()}
    snapshot = Prior(prior.generator, prior.discriminator, replace(prior.meta, steps=step, seconds=round(seconds, 3)))
    save_prior(ckpt, snapshot, extra_state={"checkpoint": state})


def _train_step(prior: Prior, images: torch.Tensor, optimisers: tuple[torch.optim.Optimizer, ...],
                config: PriorConfig, step: int) -> dict[str, float]:
    """One discriminator and one generator update (DCGAN; non-saturating generator loss)."""
    gen_net, disc = prior.generator, prior.discriminator
    opt_g, opt_d = optimisers
    batch = config.training.batch_size
    rng = torch_generator(config.seed, "prior-step", step)
    real = from_pixels(images[torch.randint(images.shape[0], (batch,), generator=rng)])
    fake = gen_net(gen_net.sample_latent(batch, generator=rng))
    ones = torch.ones(batch)
    real_logits, fake_logits = disc(real), disc(fake.detach())
    loss_d = (F.binary_cross_entropy_with_logits(real_logits, ones * (1 - config.training.label_smoothing))
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros(batch)))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    loss_g = F.binary_cross_entropy_with_logits(disc(fake), ones)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach()),
            "d_real": float(torch.sigmoid(real_logits.detach()).mean()),
            "d_fake": float(torch.sigmoid(fake_logits.detach()).mean())}


def training_data_record(config: PriorConfig, count: int) -> dict[str, Any]:
    """Which examples the prior learned from, as fields (not prose), so attacks can refuse a scenario
    whose clients hold any of them (:func:`fedsim.priors.disjoint.check_prior_disjoint`, by data source).
    ``root`` (resolved) is recorded when set: an image folder's examples are named by it."""
    spec = config.data
    record: dict[str, Any] = {"dataset": spec.dataset, "split": spec.split, "start": spec.start,
                              "stop": spec.start + count, "test_fraction": spec.test_fraction}
    if spec.root is not None:
        record["root"] = str(Path(spec.root).expanduser().resolve())
    return record


def _finished(out: Path, config: PriorConfig) -> bool:
    """Whether ``out`` already is this config's prior, fully trained (then a rerun has nothing to do)."""
    if not out.is_file():
        return False
    try:
        meta = read_prior_file(out)["meta"]
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a finished prior
        return False
    return meta.get("steps") == config.training.steps and meta.get("extra", {}).get("config") == config_fingerprint(
        config)


def train_prior(config: PriorConfig, out_path: str | Path | None = None, progress: ProgressFn | None = None,
                resume: bool = True) -> PriorTrainingResult:
    """Train (or resume training) the prior of ``config`` and write it to ``out_path`` (default ``config.output``).

    ``progress(step, total, losses)`` is called after every step. With ``resume`` (the default) an
    existing ``<out>.ckpt`` of the same config is continued and an already finished ``<out>`` is
    returned as is; without it, training starts from scratch and overwrites both. Either file may only be
    replaced when it is a fedsim prior (or checkpoint): anything else there is refused (FedsimError at
    ``--out``/``output``) before any training.
    """
    out = Path(out_path) if out_path is not None else config.output_path
    ckpt = checkpoint_path(out)
    field = "--out" if out_path is not None else "output"
    check_prior_target(out, field)  # before any training: never overwrite (or delete) a file fedsim did not write
    check_prior_target(ckpt, f"{field} (its checkpoint)")
    total = config.training.steps
    if resume and not ckpt.is_file() and _finished(out, config):
        prior = load_prior(out)
        return PriorTrainingResult(out, prior, total, total, prior.meta.seconds, {})
    if not resume:
        ckpt.unlink(missing_ok=True)
    aux = load_auxiliary_images(config)
    meta = PriorMeta(dataset=config.data.dataset, resolution=aux.resolution, channels=aux.channels,
                     latent_dim=config.model.latent_dim, width=config.model.width, data_note=aux.note)
    with torch.random.fork_rng(devices=[]):  # build_prior's default init must not move the caller's RNG
        prior = build_prior(meta)
    _init_dcgan([prior.generator, prior.discriminator], torch_generator(config.seed, "prior-init"))
    betas = config.training.betas
    optimisers = (torch.optim.Adam(prior.generator.parameters(), lr=config.training.lr_g, betas=betas),
                  torch.optim.Adam(prior.discriminator.parameters(), lr=config.training.lr_d, betas=betas))
    start, seconds = (_resume(ckpt, config, prior, optimisers) if resume and ckpt.is_file() else (0, 0.0))
    images = aux.images
    prior.generator.train()
    prior.discriminator.train()
    losses: dict[str, float] = {}
    began = time.perf_counter()
    for step in range(start, total):
        losses = _train_step(prior, images, optimisers, config, step)
        done = step + 1
        if done % config.training.checkpoint_every == 0 and done < total:
            _save_checkpoint(ckpt, config, prior, optimisers, done, seconds + time.perf_counter() - began)
        if progress is not None:
            progress(done, total, losses)
    seconds += time.perf_counter() - began
    extra = {"name": config.name, "seed": config.seed, "config": config_fingerprint(config),
             "threads": torch.get_num_threads(), "torch": str(torch.__version__), "final_losses": losses,
             "resumed_from": start, "data": training_data_record(config, len(aux.images))}
    prior.meta = replace(meta, steps=total, seconds=round(seconds, 3), extra=extra)
    prior.generator.eval()
    prior.discriminator.eval()
    save_prior(out, prior)
    ckpt.unlink(missing_ok=True)
    return PriorTrainingResult(out, prior, total, start, seconds, losses)
