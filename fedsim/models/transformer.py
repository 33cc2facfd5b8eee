"""The blocks of fedsim's two text models (:mod:`fedsim.models.gpt`, :mod:`fedsim.models.bert`).

A pre-LayerNorm transformer (GPT-2's layout; Radford et al. 2019) written out of ``nn.Linear``,
``nn.Embedding`` and ``nn.LayerNorm`` only, so that

* Opacus computes per-sample gradients of every parameter (hooks, functorch, expanded weights) and ghost
  norms of every Linear and Embedding (fast gradient clipping, Li et al., ICLR 2022); position embeddings are
  an ``nn.Embedding`` for the same reason (a bare ``nn.Parameter`` has no Opacus grad sampler);
* the query, key and value projections are three separate Linears (``blocks.<i>.attn.q``/``k``/``v``): their
  weight gradients are ``sum_t delta_t u_t^T`` over the tokens t of the batch, where ``u_t`` is the block's
  LayerNorm output, the low-rank structure DAGER (Petrov et al., NeurIPS 2024) checks candidates against;
* attention is written out (no fused kernel), so double backward works (TAG differentiates the gradient).

Inputs: token ids, int64 (B, T) with T <= the model's ``max_len``; or a float (B, T, V) distribution over the
vocabulary (a one-hot row is a token), embedded as ``x @ W_emb``: the relaxed input TAG optimizes (Deng et
al., EMNLP Findings 2021). Dropout is :class:`~fedsim.models.layers.MaskDropout` (p = ``spec.dropout``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedsim.models.layers import MaskDropout, make_activation

HEAD_DIM = 32  # heads = width // HEAD_DIM (at least 1)
DEFAULT_DEPTH = 2


def _dropout(p: float) -> nn.Module:
    return MaskDropout(p) if p > 0 else nn.Identity()


def num_heads(width: int) -> int:
    """Attention heads of a model of ``width``: ``width // 32``, at least 1, and a divisor of ``width``."""
    heads = max(1, width // HEAD_DIM)
    while width % heads:
        heads -= 1
    return heads


class TokenEmbedding(nn.Module):
    """Token + learned position embeddings: (B, T) ids or (B, T, V) distributions -> (B, T, width)."""

    def __init__(self, vocab_size: int, max_len: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_len, width)
        self.drop = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        if t > self.pos.num_embeddings:
            raise ValueError(f"sequence of {t} tokens, the model takes at most {self.pos.num_embeddings}")
        tokens = x @ self.tok.weight if x.is_floating_point() else self.tok(x)
        # (B, T) position ids, not (T,): Opacus reads the embedding's input batch-first, so a shared (T,) index
        # would give per-sample gradients of T "examples" (hooks, functorch) or none at all (ExpandedWeights);
        # contiguous (repeat, not expand): Opacus's ghost norm of an Embedding views its input
        positions = self.pos(torch.arange(t, device=tokens.device).repeat(b, 1))
        return self.drop(tokens + positions)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v Linears; ``causal`` masks future tokens."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.attn_drop = _dropout(dropout)
        self.out_drop = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)  # (B, heads, T, d_head)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        attn = self.attn_drop(torch.softmax(scores, dim=-1))
        return self.out_drop(self.out((attn @ v).transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """``x + attn(LN1(x))`` then ``x + mlp(LN2(x))``; the MLP is ``Linear(4w) -> act -> Linear(w)``."""

    def __init__(self, width: int, heads: int, activation: str, dropout: float, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), make_activation(activation), nn.Linear(4 * width, width),
                                 _dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Embedding, ``depth`` blocks and a final LayerNorm: (B, T) or (B, T, V) -> hidden states (B, T, width).

    Subclasses add the head. ``vocab_size``, ``max_len``, ``width`` and ``causal`` are public attributes, and
    :meth:`block_inputs` gives the LayerNorm outputs each block's q/k/v projections read (what DAGER tests).
    """

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, activation: str, dropout: float,
                 causal: bool) -> None:
        super().__init__()
        self.vocab_size, self.max_len, self.width, self.causal = vocab_size, max_len, width, causal
        self.embed = TokenEmbedding(vocab_size, max_len, width, dropout)
        heads = num_heads(width)
        self.blocks = nn.ModuleList(Block(width, heads, activation, dropout, causal) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)

    def hidden(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def block_inputs(self, x: Tensor, upto: int) -> list[Tensor]:
        """``[LN1_0(h_0), ..., LN1_upto(h_upto)]``: the (B, T, width) inputs of the q/k/v Linears of blocks
        0..``upto`` (eval semantics are the caller's: put the model in eval mode to switch dropout off)."""
        h = self.embed(x)
        out = []
        for i, block in enumerate(self.blocks):
            out.append(block.ln1(h))
            if i == upto:
                break
            h = block(h)
        return out
