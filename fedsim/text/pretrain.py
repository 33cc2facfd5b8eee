"""Public pretraining of a text model before private federated fine-tuning (``model.pretrain``).

The setting of Li, Tramer, Liang and Hashimoto ("Large Language Models Can Be Strong Differentially Private
Learners", ICLR 2022): a model pretrained on PUBLIC text, then fine-tuned with DP-SGD on the private data, beats
one trained privately from scratch. fedsim pretrains the scenario's architecture on the dataset's public part
(:func:`fedsim.data.text.public_sequences`; for ``kjv``: Old Testament verses, while the clients hold the New
Testament), so public and private text share no verse.

* **what**: ``gpt``: the causal LM loss (:func:`fedsim.training.lm_loss`). ``bert``: masked-LM (BERT's
  objective, Devlin et al. 2019, without the 80/10/10 split): 15 % of the positions replaced by the tokenizer's
  ``[MASK]``, cross-entropy at those positions, through a temporary ``Linear(width -> vocab)`` head that is NOT
  part of the returned state; bert's classification ``head`` keeps the scenario's seeded initialization.
* **how**: ``pretrain.steps`` Adam steps (``lr``, ``batch_size``), batches drawn with replacement from a fixed
  seed (:data:`PRETRAIN_SEED`), starting from weights initialized with that seed too: the result depends on the
  model spec, the data and the pretrain spec only, never on the scenario's seed, so one cached model serves every
  seed. The last :data:`HELD_OUT_FRACTION` of the public sequences are held out and give ``heldout_perplexity``.
* **cache**: ``$FEDSIM_CACHE_DIR/pretrained/<key>.pt`` (default ``~/.fedsim/cache``), ``key`` hashing the
  model spec (name, width, depth, activation, dropout), dataset, sequence length, tokenizer, vocabulary, pretrain
  spec, :data:`FORMAT` and the public rows' bytes (so a changed public part, e.g. by de-duplication, is never
  served an old model). Written atomically, read with ``torch.load(weights_only=True)``; a file at that name
  that fedsim did not write is left alone, an unwritable cache warns and the run goes on (uncached).

Long pretraining prints its progress to stderr (``pretraining gpt on kjv's public part: step 300/1500, loss 4.21``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.outputs import write_atomic
from fedsim.scenario import Scenario
from fedsim.seeding import seed_torch

FORMAT = 1
PRETRAIN_SEED = 0
MASK_FRACTION = 0.15
HELD_OUT_FRACTION = 0.02
MAX_HELD_OUT = 1000
_MARK = "fedsim-pretrained"
_LOADED: dict[str, dict[str, Any]] = {}  # key -> payload (this process)


def cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR/pretrained`` or ``~/.fedsim/cache/pretrained``."""
    return Path(os.environ.get("FEDSIM_CACHE_DIR") or "~/.fedsim/cache").expanduser() / "pretrained"


def cache_key(scenario: Scenario, seq_len: int, tokenizer: str, vocab_size: int,
              public: Tensor | None = None) -> str:
    """Hash of everything the pretrained weights depend on (module docstring), including the public rows
    themselves (``public`` (M, T) int64: a change of the data rule, e.g. its de-duplication, is a new model)."""
    spec, pre = scenario.model, scenario.model.pretrain
    rows = None if public is None else hashlib.sha256(public.contiguous().numpy().tobytes()).hexdigest()
    what = {"model": {k: getattr(spec, k) for k in ("name", "width", "depth", "activation", "dropout", "norm")},
            "public_rows": rows,
            "dataset": scenario.data.dataset, "seq_len": seq_len, "tokenizer": tokenizer, "vocab": vocab_size,
            "pretrain": None if pre is None else pre.model_dump(), "format": FORMAT, "seed": PRETRAIN_SEED,
            "mask": MASK_FRACTION, "held_out": [HELD_OUT_FRACTION, MAX_HELD_OUT]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def split_public(public: Tensor) -> tuple[Tensor, Tensor]:
    """(train, held-out) rows of the public sequences: the last 2 % (at most 1,000) are held out."""
    held = min(MAX_HELD_OUT, max(1, int(len(public) * HELD_OUT_FRACTION))) if len(public) > 1 else 0
    return public[: len(public) - held], public[len(public) - held:]


def _mask(x: Tensor, mask_token: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(masked input, bool (B, T) positions masked): each position with probability 0.15, at least one per row."""
    where = torch.rand(x.shape, generator=gen) < MASK_FRACTION
    where[torch.arange(len(x)), torch.randint(0, x.shape[1], (len(x),), generator=gen)] = True
    return x.masked_fill(where, mask_token), where


def _objective(model: nn.Module, mlm_head: nn.Module | None, x: Tensor, mask_token: int,
               gen: torch.Generator) -> Tensor:
    """Mean loss (nats per predicted token) of a batch (B, T): causal LM, or masked LM through ``mlm_head``."""
    if mlm_head is None:
        from fedsim.training import lm_loss

        return lm_loss(model(x), x)
    masked, where = _mask(x, mask_token, gen)
    logits = mlm_head(model.hidden(masked))  # (B, T, V)
    return F.cross_entropy(logits[where], x[where])


def _train(scenario: Scenario, model: nn.Module, public: Tensor, mask_token: int) -> dict[str, Any]:
    """Pretrain ``model`` (in place) on the train rows of ``public``; returns the cache payload."""
    pre = scenario.model.pretrain
    train, held = split_public(public)
    mlm_head = None
    if not model.causal:
        with torch.random.fork_rng(devices=[]):
            seed_torch(PRETRAIN_SEED + 1)
            mlm_head = nn.Linear(model.width, model.vocab_size)
    params = list(model.parameters()) + ([] if mlm_head is None else list(mlm_head.parameters()))
    opt = torch.optim.Adam(params, lr=pre.lr)
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    every = max(1, pre.steps // 10)
    name = f"pretraining {scenario.model.name} on {scenario.data.dataset}'s public part"
    model.train()
    for step in range(1, pre.steps + 1):
        idx = torch.randint(0, len(train), (min(pre.batch_size, len(train)),), generator=gen)
        loss = _objective(model, mlm_head, train[idx], mask_token, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pre.steps >= 100 and (step % every == 0 or step == pre.steps):
            print(f"{name}: step {step}/{pre.steps}, loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        eval_gen = torch.Generator().manual_seed(PRETRAIN_SEED + 2)
        held_loss = float(_objective(model, mlm_head, held, mask_token, eval_gen)) if len(held) else float("nan")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not _own_head(model, k)}
    return {"mark": _MARK, "format": FORMAT, "state": state, "steps": pre.steps,
            "objective": "causal LM" if mlm_head is None else "masked LM (15 %)",
            "public_sequences": len(train), "heldout_sequences": len(held),
            "heldout_loss": held_loss, "heldout_perplexity": math.exp(held_loss) if len(held) else float("nan")}


def _own_head(model: nn.Module, key: str) -> bool:
    """bert's classification head is not pretrained (it keeps the scenario's initialization)."""
    return not model.causal and key.startswith("head.")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt cache file is trained over, never trusted
        return None
    return payload if isinstance(payload, dict) and payload.get("mark") == _MARK and \
        payload.get("format") == FORMAT else None


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Cache atomically; never replace a file fedsim did not write; an unwritable cache only warns."""
    if path.exists():
        try:
            ours = torch.load(path, map_location="cpu", weights_only=True).get("mark") == _MARK
        except Exception:  # noqa: BLE001 - unreadable: not known to be ours
            ours = False
        if not ours:
            warnings.warn(f"pretrained model not cached: {path} exists and is not a fedsim cache file", stacklevel=3)
            return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh: torch.save(payload, fh))
    except OSError as err:
        warnings.warn(f"pretrained model not cached ({path}): {err}", stacklevel=3)


def _payload(scenario: Scenario, model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(cache key, payload) of the scenario's pretrained model: from this process, the disk cache, or trained."""
    from fedsim.data import load_dataset
    from fedsim.data.text import public_sequences
    from fedsim.models import build_model
    from fedsim.text.tokenizer import mask_id

    data = load_dataset(scenario.data)
    seq_len = int(model.max_len)
    public = public_sequences(scenario.data, seq_len)
    key = cache_key(scenario, seq_len, data.tokenizer, data.vocab_size, public)
    if key in _LOADED:
        return key, _LOADED[key]
    path = cache_dir() / f"{key}.pt"
    payload = _read(path) if path.is_file() else None
    if payload is None:
        fresh = build_model(scenario.model.model_copy(update={"pretrain": None}), (seq_len,),
                            int(model.head.out_features), seed=PRETRAIN_SEED, vocab_size=data.vocab_size)
        payload = _train(scenario, fresh, public, mask_id(data.tokenizer))
        payload["public_corpus"] = f"{scenario.data.dataset} public part ({len(public)} sequences of {seq_len} tokens)"
        _write(path, payload)
    _LOADED[key] = payload
    return key, payload


def pretrained_state(scenario: Scenario, model: nn.Module) -> dict[str, Tensor]:
    """The state dict to load into ``model`` (the scenario's seeded ``gpt``/``bert``): pretrained on the public
    part of ``scenario.data.dataset`` (cached), with bert's classification head taken from ``model`` itself.

    Raises :class:`~fedsim.errors.ScenarioError` (``model.pretrain``) for a dataset without a public part.
    """
    _, payload = _payload(scenario, model)
    state = {k: v.clone() for k, v in payload["state"].items()}
    for k, v in model.state_dict().items():
        if _own_head(model, k):
            state[k] = v.detach().clone()
    return state


def pretrain_record(scenario: Scenario, model: nn.Module) -> dict[str, Any]:
    """What metrics.json records about the pretraining (steps, objective, public corpus, cache key, held-out
    perplexity on the public part)."""
    key, payload = _payload(scenario, model)
    pre = scenario.model.pretrain
    return {"from_pretrained": True, "steps": payload["steps"], "lr": pre.lr, "batch_size": pre.batch_size,
            "objective": payload["objective"], "public_corpus": payload.get("public_corpus", ""),
            "public_train_sequences": payload["public_sequences"], "heldout_sequences": payload["heldout_sequences"],
            "public_heldout_perplexity": payload["heldout_perplexity"], "cache_key": key}
