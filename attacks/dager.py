"""DAGER: exact text from the low rank of attention-layer gradients (Petrov, Dimitrov, Baader, Mueller, Vechev:
"DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024). SoK threat model B. FedSGD only.

The q/k/v Linears of block ``i`` read the LayerNorm outputs ``u`` of every token of the batch, so their stacked weight
gradient (:func:`fedsim.attacks.text_spans.qkv_gradient`, (3w, w)) has its row space inside ``span{u}`` and rank at
most the
number N of tokens with a gradient (:mod:`fedsim.attacks.text_spans`). While ``N < w`` (the RANK CONDITION) that span
is a
proper subspace, and a candidate ``u`` lies in it (relative residual ~1e-7 in float32) only if it was used:

1. **Layer 1, per position.** For every position p and every token v, ``u = blocks[0].ln1(tok[v] + pos[p])``; the
   tokens whose residual is below ``span_tol`` are position p's candidates. A token that repeats across positions
   puts ``pos[p] - pos[p']`` into the span and lets through false (v, p) pairs, so the sets are supersets.
2. **Layer 2, decoder (gpt, causal).** Prefixes grow one position at a time: a prefix + candidate token is kept only
   if the block-1 input at its last position (``model.block_inputs(prefix, upto=1)[1][:, -1]``, which depends on
   the prefix only) lies in the span of block 1's q/k/v gradient. Exact: every true prefix passes, and false ones fail
   almost surely (attention mixes the whole prefix non-linearly).
3. **The last token (gpt's LM loss).** Position T-1 is only a target: nothing reads its embedding, so no q/k/v
   gradient shows it. With the recovered prefixes (positions 0..T-2) the attacker computes every prediction
   ``p_{bt}`` and head input ``h_{bt}``; the head's bias gradient ``(1/N') sum (p - onehot(y))`` and weight gradient
   ``(1/N') sum (p - onehot(y)) h^T`` (N' = B (T-1) predictions) then give ``sum_b onehot(y_{b,T-1})
   h_{b,T-2}^T`` in closed form, and least squares on the known ``h_{b,T-2}`` assigns each sequence its last token.
4. **Encoder (bert, bidirectional).** The layer-2 input of a position depends on the whole sequence, so prefixes do
   not work. What is implemented (DAGER's encoder search is heuristic too; this one is fedsim's): coordinate descent
   over the layer-1 candidate sets from random starts (up to ``encoder_restarts`` per sequence, 2 B at a time,
   until B sequences are accepted); each sweep replaces one position at a time
   by the candidate minimizing the mean layer-2 span residual over all positions; a converged sequence whose
   largest layer-2 residual is below the tolerance is accepted (exact sequences pass; mixtures do not). At batch 1
   the candidate sets are singletons (without repeats) and recovery is exact; at B > 1 it may miss sequences.

Output: at most B sequences (``ClientUpdate.examples_to_reconstruct``). When more pass (steps 2 and 4 accept false
sequences below the tolerance), the B with the lowest largest layer-2 residual are kept (``stats["surplus_dropped"]``);
the ground truth never chooses.

Adaptive (``adaptive: true``, fedsim's noise-aware variant, not in the paper): under DP-SGD noise no true token lies
below a noiseless ``span_tol`` (measured on the text quickstart's gpt: the strict attack recovers nothing from sigma
1e-6 on, C 1). An attacker who knows noise is present ranks instead of thresholding, reading only the update: layer 1
keeps per position the ``adaptive_keep x B`` tokens of lowest block-0 residual (each position holds B tokens: the
known count), the decoder keeps per position the ``beam`` prefixes of lowest block-1 residual, and the B final
sequences of lowest largest block-1 residual are returned (the encoder accepts its first 2 B converged starts and
returns the B best the same way). At sigma 0 it finds what the strict attack finds when the true tokens rank first;
measured exact up to sigma 1e-5, broken at 1e-4 (``benchmarks/text_dp_leakage.py``, docs/text.md).

Rank condition: N = B (T-1) tokens for gpt's LM loss (the last position has no q/k/v gradient), B T for bert, and
N < width; when it fails the attack fails with the sizes. A gradient of higher numerical rank than N (noise: DP-SGD)
keeps its N leading singular directions (``stats["rank_truncated"]``); true tokens then lie off the noisy span and the
attack recovers nothing.
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.base import Attack, AttackParams, ProgressFn, register_attack
from fedsim.attacks.text_spans import qkv_gradient, row_space, span_residual
from fedsim.attacks.victim import UpdateMismatchError, attacker_mode, check_update, rebuild_model
from fedsim.threat import ClientUpdate, Reconstruction


class DagerParams(AttackParams):
    """Options of DAGER."""

    span_tol: float = Field(1e-4, gt=0, lt=1, description="relative residual below which a vector lies in the "
                            "gradient's span (true tokens measured <= 5e-7 in float32, a random vector ~sqrt(1 - r/w))")
    rank_rtol: float | None = Field(None, gt=0, lt=1, description="singular values above this share of the largest "
                                    "count in the rank; default 10 float32 eps "
                                    "(fedsim.attacks.text_spans.FLOAT32_RTOL)")
    max_prefixes: int = Field(20000, ge=1, description="decoder: most prefixes kept per position (partial beyond)")
    encoder_restarts: int = Field(20, ge=1, description="encoder: random starts of the coordinate search per "
                                  "sequence of the batch")
    encoder_sweeps: int = Field(10, ge=1, description="encoder: most sweeps per start")
    adaptive: bool = Field(False, description="noise-aware search (module doc, 'Adaptive'): rank candidates by span "
                           "residual instead of accepting those below span_tol")
    adaptive_keep: int = Field(2, ge=1, description="adaptive: layer-1 candidates kept per position, times the batch")
    beam: int = Field(64, ge=1, description="adaptive: decoder prefixes kept per position (lowest layer-2 residual)")


class _Spans:
    """Bases of the q/k/v gradient row spaces of blocks 0 and 1, and each block's span tolerance."""

    def __init__(self, update: ClientUpdate, rtol: float | None, span_tol: float) -> None:
        self.bases: list[Tensor] = []
        self.ranks: list[int] = []
        self.tols: list[float] = []
        for block in (0, 1):
            basis, _, rank = row_space(qkv_gradient(update.update, block), rtol)
            self.bases.append(basis)
            self.ranks.append(rank)
            self.tols.append(span_tol)

    def truncate(self, rank: int) -> None:
        """Keep the ``rank`` leading directions of each basis."""
        self.bases = [b[:, :rank] for b in self.bases]


@register_attack("dager")
class Dager(Attack):
    """Exact sequences from span checks against the attention-gradient subspaces (gpt: prefix search; bert:
    coordinate search)."""

    Params = DagerParams
    inputs: ClassVar[tuple[str, ...]] = ("tokens",)
    protocols: ClassVar[tuple[str, ...]] = ("fedsgd",)
    summary = ("DAGER (Petrov et al. 2024): exact text from attention-gradient span checks; needs B x T positions < "
               "width (gpt: B x (T-1))")
    min_iterations: ClassVar[int] = 0
    threat_model: ClassVar[str] = "B"
    assumes: ClassVar[tuple[str, ...]] = ("the global model sent to the client (the server built it)",
                                          "the number of examples from the update's metadata",
                                          "fewer tokens in the batch than the model's width (rank condition)")

    def reconstruct(self, update: ClientUpdate, progress: ProgressFn | None = None) -> Reconstruction:
        """Recovered sequences, ``tokens`` int64 (K, T) (-1 where a position could not be filled)."""
        start = time.perf_counter()
        reason = check_update(update)
        if reason is not None:
            return Reconstruction.failure(reason)
        task = update.task
        if not task.is_text or task.protocol != "fedsgd":
            return Reconstruction.failure(f"dager inverts fedsgd gradients of text models (task {task.dataset!r}, "
                                          f"protocol {task.protocol!r})")
        try:
            model = attacker_mode(rebuild_model(task, update.global_state)).double()
        except UpdateMismatchError as err:
            return Reconstruction.failure(str(err))
        if not hasattr(model, "block_inputs") or len(getattr(model, "blocks", ())) < 2:
            return Reconstruction.failure(f"dager needs a transformer with at least 2 blocks (fedsim's gpt or bert), "
                                          f"not this {task.model.get('name')} model")
        causal = bool(model.causal)
        lm = causal and task.kind == "language_modeling"
        batch, seq_len, width = update.examples_to_reconstruct, int(task.input_shape[0]), int(model.width)
        tokens_seen = batch * (seq_len - 1 if lm else seq_len)
        sizes = {"batch": float(batch), "seq_len": float(seq_len), "width": float(width),
                 "tokens_in_gradient": float(tokens_seen)}
        if tokens_seen >= width:
            return Reconstruction.failure(
                f"rank condition fails: {tokens_seen} tokens with a q/k/v gradient (batch {batch} x "
                f"{seq_len - 1 if lm else seq_len} positions) >= width {width}; the span is the whole space", **sizes)
        try:
            spans = _Spans(update, self.params.rank_rtol, self.params.span_tol)
        except KeyError as err:
            return Reconstruction.failure(f"the update has no entry {err.args[0]!r}", **sizes)
        sizes.update(rank_block0=float(spans.ranks[0]), rank_block1=float(spans.ranks[1]))
        if max(spans.ranks) > tokens_seen:  # noise (DP-SGD): keep the top directions the tokens could span
            sizes["rank_truncated"] = (f"numerical ranks {spans.ranks} exceed the {tokens_seen} tokens (a noisy "
                                       f"gradient): kept the top {tokens_seen} singular directions")
            spans.truncate(tokens_seen)
        positions = seq_len - 1 if lm else seq_len
        with torch.no_grad():
            cands = [self._layer1(model, spans.bases[0], p, spans.tols[0], batch) for p in range(positions)]
            sizes["layer1_candidates"] = float(sum(len(c) for c in cands))
            if causal:
                seqs, partial = self._decoder(model, spans.bases[1], cands, spans.tols[1])
                seqs = self._best(model, spans.bases[1], seqs, batch, sizes)
                if lm and len(seqs):
                    seqs = torch.cat([seqs, self._last_tokens(model, update, seqs, batch)[:, None]], dim=1)
            else:
                deadline = None if self.budget.time_limit_s is None else start + self.budget.time_limit_s
                tol = float("inf") if self.params.adaptive else spans.tols[1]  # adaptive: _best ranks them all
                seqs, partial = self._encoder(model, spans.bases[1], cands, batch, deadline, tol, progress)
                seqs = self._best(model, spans.bases[1], seqs, batch, sizes)
        sizes.update(span_tol_block0=spans.tols[0], span_tol_block1=spans.tols[1])
        if progress is not None:
            progress(0, 0)
        stats: dict[str, float | str] = {**sizes, "recovered": float(len(seqs)),
                                         "seconds": time.perf_counter() - start}
        if partial:
            stats["partial"] = partial
            stats["time_limited"] = float(partial.startswith("budget.time_limit_s"))  # every output marks it
        tokens = seqs if len(seqs) else torch.empty(0, seq_len, dtype=torch.int64)
        return Reconstruction(images=None, labels=None, tokens=tokens.to(torch.int64), stats=stats)

    def _layer1(self, model: nn.Module, basis: Tensor, position: int, tol: float, batch: int) -> Tensor:
        """Token ids v whose ``blocks[0].ln1(tok[v] + pos[position])`` lies in the block-0 span (adaptive: the
        ``adaptive_keep * batch`` of lowest residual, best first)."""
        u = model.blocks[0].ln1(model.embed.tok.weight + model.embed.pos.weight[position])
        resid = span_residual(u, basis)
        if self.params.adaptive:
            return torch.argsort(resid, stable=True)[:self.params.adaptive_keep * batch]
        return torch.nonzero(resid < tol).flatten()

    def _best(self, model: nn.Module, basis: Tensor, seqs: Tensor, batch: int, stats: dict) -> Tensor:
        """At most ``batch`` (the view's ``examples_to_reconstruct``) of the accepted ``seqs`` (K, L): those with
        the lowest largest layer-2 span residual (the attack's own acceptance score; never the ground truth), in
        that order. More than ``batch`` pass when false sequences slip under the tolerance; returning them would
        make the scorer pick among them with the truth (an oracle). ``stats["surplus_dropped"]`` counts the rest."""
        if len(seqs) <= batch:
            return seqs
        worst = self._layer2_residual(model, basis, seqs).amax(1)
        stats["surplus_dropped"] = float(len(seqs) - batch)
        return seqs[torch.argsort(worst, stable=True)[:batch]]

    def _layer2_residual(self, model: nn.Module, basis: Tensor, seqs: Tensor) -> Tensor:
        """(K, L) layer-2 span residuals of every position of ``seqs`` (K, L)."""
        u = model.block_inputs(seqs, upto=1)[1]
        return span_residual(u.reshape(-1, u.shape[-1]), basis).view(seqs.shape)

    def _decoder(self, model: nn.Module, basis: Tensor, cands: list[Tensor],
                 tol: float) -> tuple[Tensor, str | None]:
        """Prefix search: (K, len(cands)) sequences whose every prefix passes the layer-2 test."""
        prefixes = torch.empty(1, 0, dtype=torch.int64)
        for p, cand in enumerate(cands):
            if len(prefixes) * len(cand) > self.params.max_prefixes:
                return prefixes, (f"stopped at position {p}: {len(prefixes)} prefixes x {len(cand)} candidates > "
                                  f"max_prefixes {self.params.max_prefixes}")
            ext = torch.cat([prefixes.repeat_interleave(len(cand), 0), cand.repeat(len(prefixes))[:, None]], dim=1)
            if len(ext) == 0:
                return ext, f"no candidate passed at position {p}"
            resid = self._layer2_residual(model, basis, ext)[:, -1]
            if self.params.adaptive:  # the beam of lowest residual, not a noiseless tolerance
                prefixes = ext[torch.argsort(resid, stable=True)[:self.params.beam]]
            else:
                prefixes = ext[resid < tol]
        return prefixes, None

    @staticmethod
    def _last_tokens(model: nn.Module, update: ClientUpdate, prefixes: Tensor, batch: int) -> Tensor:
        """Each prefix's token at position T-1 from the LM head's gradients (module docstring, step 3)."""
        k, n = prefixes.shape  # n = T - 1 predictions per sequence
        scale = batch * n  # the mean over B (T-1) predictions
        h = model.hidden(prefixes)  # (K, n, w)
        p = torch.softmax(model.head(h), dim=-1)  # (K, n, V)
        g_w = torch.as_tensor(update.update["head.weight"]).double()
        known = torch.einsum("ktv,ktw->vw", p, h)
        targets = prefixes[:, 1:]  # targets of positions 0..n-2
        known.index_add_(0, targets.reshape(-1), -h[:, :-1].reshape(-1, h.shape[-1]))
        rest = known - scale * g_w  # (V, w) = sum_k onehot(last_k) h_{k, n-1}
        assign = rest @ torch.linalg.pinv(h[:, -1])  # (V, K)
        return assign.argmax(dim=0)

    def _encoder(self, model: nn.Module, basis: Tensor, cands: list[Tensor], batch: int,
                 deadline: float | None, tol: float, progress: ProgressFn | None = None) -> tuple[Tensor, str | None]:
        """Coordinate search over the per-position candidate sets (module docstring, step 4): up to
        ``encoder_restarts * batch`` random starts, advanced ``2 * batch`` at a time as one batch, until ``batch``
        distinct sequences pass the layer-2 acceptance test or ``deadline`` (``time.perf_counter``) passes.
        ``progress(starts done, starts at most)`` after each chunk: near the rank bound on real text this search can
        take minutes (bert, batch 7: about 4 min on a 2-core CPU), and the user sees it advance."""
        if any(len(c) == 0 for c in cands):
            return torch.empty(0, len(cands), dtype=torch.int64), "a position has no layer-1 candidate"
        gen = torch.Generator().manual_seed(self.seed)
        found = torch.empty(0, len(cands), dtype=torch.int64)
        total = self.params.encoder_restarts * batch
        for _chunk in range(0, total, 2 * batch):
            seqs = self._descend(model, basis, cands, torch.stack(
                [c[torch.randint(len(c), (2 * batch,), generator=gen)] for c in cands], dim=1))
            accepted = seqs[self._layer2_residual(model, basis, seqs).amax(1) < tol]
            found = torch.unique(torch.cat([found, accepted]), dim=0)
            if progress is not None:
                progress(min(_chunk + 2 * batch, total), total)
            if len(found) >= batch:
                break
            if deadline is not None and time.perf_counter() > deadline:
                return found, f"budget.time_limit_s reached after {_chunk + 2 * batch} starts"
        return found, None

    def _descend(self, model: nn.Module, basis: Tensor, cands: list[Tensor], seqs: Tensor) -> Tensor:
        """Sweeps of coordinate descent on the mean layer-2 residual, every row of ``seqs`` (R, T) at once."""
        for _sweep in range(self.params.encoder_sweeps):
            before = seqs.clone()
            for p, cand in enumerate(cands):
                if len(cand) == 1:
                    seqs[:, p] = cand[0]
                    continue
                trial = seqs.repeat_interleave(len(cand), 0)
                trial[:, p] = cand.repeat(len(seqs))
                score = self._layer2_residual(model, basis, trial).mean(1).view(len(seqs), len(cand))
                seqs[:, p] = cand[score.argmin(1)]
            if torch.equal(before, seqs):
                break
        return torch.unique(seqs, dim=0)
