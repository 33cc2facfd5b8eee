"""A small Vision Transformer, the ViT victim of the Dropout Inversion Attack paper.

Scheliga, Mäder, Seeland ("Dropout is NOT All You Need to Prevent Gradient Leakage", AAAI 2023)
attack a lucidrains-style ViT with 4 layers, width 256, 16 heads, patch 4 and MLP dim 256 on 32x32
inputs. This is that network, pre-norm:

* patch embedding: non-overlapping ``patch x patch`` patches -> Linear, a learned class token and
  learned position embeddings, then **dropout** (embeddings). As in the vit-pytorch version the
  paper used, there is no LayerNorm on the raw patches: one would make every patch's mean and scale
  invisible to the gradient, so no attack could recover them;
* ``depth`` blocks of ``x + Attention(LN(x))`` and ``x + FeedForward(LN(x))``, where attention has
  **dropout on the attention probabilities** (mask per sample x head x token x token) and on the
  **out-projection**, and the feed-forward ``Linear -> GELU -> dropout -> Linear -> dropout``
  (**2x in the FFN**);
* final LayerNorm, the class token, one Linear head.

So a model with ``dropout: p`` has ``1 + 4 * depth`` :class:`MaskDropout` layers, each drawing a
mask of its activation's full shape, which is what the DIA optimizes. Width is ``8 * spec.width``
(256 at the default width 32) and so is the MLP dim; the head count is ``gcd(16, width)``
(16 at the default). LayerNorm is the ViT's own normalization, so ``spec.norm`` is not used. The
attention is written out (no fused kernel), so the model supports double backward. On 32x32 inputs
the default model has 65 tokens and about 1.6 M parameters: small enough for CPU attacks, though an
order of magnitude slower per step than the ``mlp``, and it needs thousands of steps to invert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedsim.errors import ScenarioError
from fedsim.models.base import MODELS, InputShape, activation_of, check_io
from fedsim.models.layers import MaskDropout, make_activation
from fedsim.scenario import ModelSpec

DEPTH = 4
HEADS = 16
PATCH = 4
WIDTH_MULTIPLIER = 8


def _dropout(p: float) -> nn.Module:
    return MaskDropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with dropout on the probabilities and the out-projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_dropout = _dropout(dropout)
        self.to_out = nn.Linear(dim, dim)
        self.out_dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d_head)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = self.attn_dropout(attn) @ v
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Pre-norm ``LN -> Linear -> act -> dropout -> Linear -> dropout``."""

    def __init__(self, dim: int, hidden: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            make_activation(activation),
            _dropout(dropout),
            nn.Linear(hidden, dim),
            _dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ViT(nn.Module):
    """patches -> embed (+cls, +pos, dropout) -> [x + attn, x + ffn] x depth -> LN -> cls -> Linear."""

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        dim: int = 256,
        depth: int = DEPTH,
        heads: int = HEADS,
        mlp_dim: int = 256,
        patch: int = PATCH,
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        self.patch = patch
        num_patches = (h // patch) * (w // patch)
        patch_dim = c * patch * patch
        self.to_patch_embedding = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.emb_dropout = _dropout(dropout)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dropout), FeedForward(dim, mlp_dim, activation, dropout)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patches(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_patches, C * patch * patch), patches in row-major order."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.to_patch_embedding(self.patches(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.emb_dropout(torch.cat([cls, tokens], dim=1) + self.pos_embedding)
        for attn, ff in self.layers:  # type: ignore[misc]
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x)[:, 0])


@MODELS.register("vit")
def build_vit(spec: ModelSpec, input_shape: InputShape, num_classes: int) -> nn.Module:
    """The DIA ViT: 4 layers, width and MLP dim ``8 * spec.width`` (256 by default), patch 4, GELU."""
    check_io("vit", input_shape, num_classes)
    _, h, w = input_shape
    if h % PATCH or w % PATCH:
        raise ScenarioError("model.name", f"vit needs height and width divisible by {PATCH}, got {h}x{w}")
    dim = WIDTH_MULTIPLIER * spec.width
    return ViT(
        input_shape,
        num_classes,
        dim=dim,
        heads=math.gcd(HEADS, dim),
        mlp_dim=dim,
        activation=activation_of(spec, "gelu"),
        dropout=spec.dropout,
    )
