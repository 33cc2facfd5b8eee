"""Linear-algebra pieces of the text attacks (:mod:`fedsim.attacks.token_set`, :mod:`fedsim.attacks.dager`).

A Linear layer ``y = W u + b`` that reads vectors ``u_1..u_N`` has the weight gradient ``dL/dW = sum_n delta_n u_n^T``
(out x in): every row of it is a combination of the ``u_n``, so its row space lies in ``span{u_n}`` and has rank at
most N (DAGER, Petrov et al., NeurIPS 2024, Sec. 3). :func:`row_space` finds that span from a gradient by SVD and
:func:`span_residual` measures how far a candidate vector lies from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

#: Default relative singular-value floor of :func:`row_space`: 10 float32 epsilons. A float32 gradient's rounding
#: leaves its null directions at about 0.1-0.3 eps times the largest singular value (measured on fedsim's gpt and bert);
#: data directions measured down to ~2e-5 (torch's ``matrix_rank`` rule, max(m, n) eps = 4.6e-5 for a (384, 128)
#: stack, cut real ones).
FLOAT32_RTOL = 10 * torch.finfo(torch.float32).eps


def qkv_gradient(grads: Mapping[str, Tensor], block: int) -> Tensor:
    """The weight gradients of ``blocks.<block>.attn.q``, ``.k`` and ``.v`` stacked row-wise, float64 (3 w, w).

    All three Linears read the same LayerNorm outputs, so the stack has the same row space as each of them, and is
    better conditioned: a token whose query gradient is tiny still shows in its key or value gradient. Raises
    ``KeyError`` naming a missing entry."""
    names = [f"blocks.{block}.attn.{p}.weight" for p in ("q", "k", "v")]
    for name in names:
        if name not in grads:
            raise KeyError(name)
    return torch.cat([torch.as_tensor(grads[n]).detach().double().cpu() for n in names])


def row_space(g: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor, int]:
    """``(basis, singular values, rank)`` of the row space of ``g`` (m, w): ``basis`` (w, r) orthonormal columns, the
    right singular vectors whose singular values exceed ``rtol`` times the largest (default :data:`FLOAT32_RTOL`:
    clients compute in float32)."""
    _, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh[:0].T, s, 0
    tol = FLOAT32_RTOL if rtol is None else rtol
    rank = int((s > tol * s[0]).sum())
    return vh[:rank].T.contiguous(), s, rank


def span_residual(u: Tensor, basis: Tensor) -> Tensor:
    """``||u - P u|| / ||u||`` per row of ``u`` (N, w), P the projection onto the columns of ``basis`` (w, r)
    (orthonormal): 0 for a vector in the span, about ``sqrt(1 - r / w)`` for a random one. float64 (N,)."""
    u = u.double()
    resid = u - (u @ basis) @ basis.T
    return resid.norm(dim=1) / u.norm(dim=1).clamp_min(1e-300)


def token_embedding(model: nn.Module, vocab_size: int) -> tuple[str, nn.Embedding] | None:
    """``(parameter name, module)`` of the model's token embedding: ``embed.tok`` when present (fedsim's text
    models), else the only ``nn.Embedding`` with ``vocab_size`` rows; None when there is none or several."""
    modules = dict(model.named_modules())
    tok = modules.get("embed.tok")
    if isinstance(tok, nn.Embedding):
        return "embed.tok.weight", tok
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
    return (f"{found[0][0]}.weight", found[0][1]) if len(found) == 1 else None
