"""Which tokens a client's batch used, from the token-embedding gradient (Melis, Song, De Cristofaro, Shmatikov:
"Exploiting Unintended Feature Leakage in Collaborative Learning", IEEE S&P 2019, Sec. 5; the first step of LAMP and
DAGER). SoK threat model B: the update and the architecture, nothing else.

The embedding ``E`` (V, w) enters the model only through the rows it looks up, so ``dL/dE[v] = sum_{t: x_t = v}
dL/de_t``: the row of a token the batch never used is EXACTLY zero (float arithmetic adds no nonzero to it), the row
of a used token is nonzero unless its gradients cancel to the last bit. The recovered set is the nonzero rows.

* **fedsgd**: the gradient itself. **fedavg**: the weight delta. An unused row stays exactly zero under plain SGD,
  SGD with momentum and Adam (their updates are positive combinations of past gradients; zero history gives zero
  step), so the set is the union of the tokens of every local batch. Weight decay moves EVERY row (by
  ``((1 - lr wd)^k - 1) E[v]``): the attack detects that (the median row's delta is parallel to its weight row) and
  fails with the reason instead of guessing.
* **The causal LM's last position.** The token at position T-1 of a ``gpt`` sequence is only a TARGET (position T-2
  predicts it; nothing reads its embedding), so its embedding row is zero unless it occurs elsewhere. It shows in the
  untied head's bias gradient, ``dL/db_v = sum_t w_t (p_t(v) - [y_t = v])``: a NEGATIVE entry needs ``[y_t = v]``
  for some t, so every token with a negative head-bias gradient (a positive fedavg delta: sign flipped) is used
  (precision stays exact, also over several local steps, momentum or Adam: positive combinations of gradients). A
  last-position token the model already predicts with total probability >= its count is missed (recall < 1 then).
  Under fedavg with Adam the summed head-bias SIGN of a target-only token can flip (the per-coordinate
  normalisation weighs the local steps unequally), so such a token may be missed: ``stats["not_exact"]`` says so
  (also when the local optimizer is not granted and Adam cannot be ruled out); the mode is "exact" only otherwise.
* **Noise (DP-SGD, a noisy update).** No row is zero. Assuming fewer than half the rows were used, every unused row
  is pure Gaussian noise of one scale s, so its norm is ``s * chi_w``: the attack estimates s from the median row
  norm and keeps the rows above the ``1 - alpha / V`` quantile of ``s * chi_w`` (a family-wise false-positive rate
  ``alpha`` over the V rows); the head-bias rule is not used. Precision collapses when the noise drowns the rows.
  ``stats["threshold"]`` is the row-norm threshold used (0 in the noiseless case).
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.text_spans import token_embedding
from fedsim.attacks.victim import UpdateMismatchError, check_update, rebuild_model
from fedsim.threat import ClientUpdate, Reconstruction


class TokenSetParams(AttackParams):
    """Options of the token-set attack."""

    alpha: float = Field(0.01, gt=0, lt=1, description="noisy updates: chance that any unused row passes the "
                         "threshold (family-wise over the vocabulary)")
    decay_cosine: float = Field(0.99, gt=0, le=1, description="fedavg: the median row's |cos(delta, weight)| above "
                                "which every row moved by weight decay (the attack then fails)")


def noise_threshold(norms: Tensor, width: int, alpha: float) -> tuple[float, float]:
    """``(threshold, noise scale s)`` for rows whose norms are ``s * chi_width`` when unused: s from the median
    norm (``median / chi.median(width)``), threshold the ``1 - alpha / V`` quantile of ``s * chi_width``."""
    from scipy.stats import chi  # imported here: scipy.stats costs 1-3 s in every plug-in import

    scale = float(norms.median()) / float(chi.median(width))
    return scale * float(chi.ppf(1.0 - alpha / norms.numel(), width)), scale


def decay_cosine(delta: Tensor, weight: Tensor) -> float:
    """Median over rows of ``|cos(delta[v], weight[v])|``: near 1 when weight decay moved every row."""
    cos = (delta * weight).sum(1).abs() / (delta.norm(dim=1) * weight.norm(dim=1)).clamp_min(1e-300)
    return float(cos.median())


def _head_caveat(model: torch.nn.Module, update: ClientUpdate) -> str | None:
    """Why the set may not be exact in the noiseless case, or None when it is (module doc): a causal LM's
    target-only tokens come from the head-bias SIGN, which fedavg with Adam can flip (its per-coordinate
    normalisation weighs the local steps unequally); with the local optimizer not granted it cannot be ruled out."""
    task = update.task
    if not (getattr(model, "causal", False) and task.kind == "language_modeling") or task.protocol != "fedavg":
        return None
    optimizer = (update.hyperparams or {}).get("optimizer")
    if optimizer == "adam":
        return ("fedavg with Adam: a token that is only a next-token target is read from the head-bias sign, which "
                "Adam's normalisation can flip, so it may be missed (recall < 1; precision stays exact)")
    if optimizer is None:
        return ("the local optimizer is not known (knowledge.local_hparams): under Adam a token that is only a "
                "next-token target may be missed")
    return None


@register_attack("token_set")
class TokenSet(Attack):
    """The set of token ids a batch used: the nonzero rows of the token-embedding gradient (or weight delta)."""

    Params = TokenSetParams
    inputs: ClassVar[tuple[str, ...]] = ("tokens",)
    summary = "Token set (Melis et al. 2019): the nonzero rows of the token-embedding gradient; exact without noise"
    min_iterations: ClassVar[int] = 0
    threat_model: ClassVar[str] = "B"
    assumes: ClassVar[tuple[str, ...]] = ("the global model sent to the client (the server built it)",
                                          "an embedding untied from the LM head", "no weight decay (fedavg)")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """The distinct token ids used, sorted (``token_set``); ``tokens`` and ``images`` stay None."""
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        task = update.task
        if not task.is_text:
            return Reconstruction.failure(f"token_set reads a token embedding; the task {task.dataset!r} is not text")
        try:
            model = rebuild_model(task, update.global_state)
        except UpdateMismatchError as err:
            return Reconstruction.failure(str(err))
        found = token_embedding(model, task.vocab_size)
        if found is None:
            return Reconstruction.failure(f"the {task.model.get('name')} model has no single token embedding")
        name, emb = found
        if name not in update.update:
            return Reconstruction.failure(f"the update has no entry {name!r}")
        g = torch.as_tensor(update.update[name]).detach().double()
        if g.shape != emb.weight.shape:
            return Reconstruction.failure(f"update[{name!r}] has shape {tuple(g.shape)}, the model's token embedding "
                                          f"{tuple(emb.weight.shape)}")
        norms = g.norm(dim=1)
        stats: dict[str, float | str] = {"rows": float(norms.numel()), "rows_nonzero": float((norms > 0).sum())}
        if bool((norms > 0).all()):
            if task.protocol == "fedavg":
                cos = decay_cosine(g, emb.weight.detach().double())
                stats["decay_cosine"] = cos
                if cos >= self.params.decay_cosine:
                    return Reconstruction.failure(
                        f"every row of the token embedding moved, each in proportion to its weights (median "
                        f"|cos| {cos:.3f}): weight decay; the used rows cannot be told exactly", **stats)
            threshold, scale = noise_threshold(norms, g.shape[1], self.params.alpha)
            used = torch.nonzero(norms > threshold).flatten()
            stats.update(mode="noisy: every row is nonzero; rows above the chi quantile of the median-row noise",
                         threshold=threshold, noise_scale=scale)
        else:
            used = torch.nonzero(norms > 0).flatten()
            caveat = _head_caveat(model, update)
            stats.update(mode="exact: the nonzero rows" if caveat is None else f"the nonzero rows; {caveat}",
                         threshold=0.0)
            if caveat is not None:
                stats["not_exact"] = caveat
            extra = self._head_targets(model, update)
            stats["from_head"] = float(len(set(extra.tolist()) - set(used.tolist())))
            used = torch.cat([used, extra])
        if progress is not None:
            progress(0, 0)
        token_set = torch.unique(used).to(torch.int64)
        stats.update(recovered=float(token_set.numel()), seconds=time.perf_counter() - start)
        return Reconstruction(images=None, labels=None, token_set=token_set, stats=stats)

    @staticmethod
    def _head_targets(model: torch.nn.Module, update: ClientUpdate) -> Tensor:
        """Causal LM only: tokens whose untied head bias has a negative gradient (a positive fedavg delta); each is a
        target of some position (see the module docstring). Empty for other tasks or models."""
        head = getattr(model, "head", None)
        name = "head.bias"
        if (update.task.kind != "language_modeling" or head is None or getattr(head, "bias", None) is None
                or name not in update.update):
            return torch.empty(0, dtype=torch.int64)
        b = torch.as_tensor(update.update[name]).detach().double()
        if b.shape != (update.task.vocab_size,):
            return torch.empty(0, dtype=torch.int64)
        sign = -1.0 if update.task.protocol == "fedavg" else 1.0
        return torch.nonzero(sign * b < 0).flatten()
