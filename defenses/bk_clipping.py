"""Book-keeping per-example clipping: DP-SGD's clipped gradient sum from ONE backward pass (``grad_sample_mode: bk``).

Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost", ICML 2023 (BK): the
backward pass computes only each layer's output gradient g (no weight gradients); with the layer's input a, kept
from the forward pass, each example's squared gradient norm is summed layer by layer, then the clipping factors
c_i = min(1, C / ||grad_i||) (Opacus's flat clipping, ``C / (norm + 1e-6)`` clamped at 1) weight a second,
cheap contraction per layer that gives sum_i c_i grad_i directly (for a linear layer ``a^T (c * g)``: one matmul).
Per layer the norms come from the cheaper of two exact forms (mixed ghost clipping, Bu et al. AAAI 2023):

* ghost norm (Li et al. ICLR 2022): ``||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``, cost T^2 (d + p) per
  example (T = 1 for a (B, d) input: ``||a||^2 ||g||^2``);
* the per-example gradient itself, ``g_i^T a_i`` (p x d, cost T d p), then its norm (and the clipped sum from it).

Layers: ``nn.Linear`` (any leading dims), ``nn.Conv2d`` (groups 1, zero padding; inputs unfolded), ``nn.Embedding``
(no max_norm, scale_grad_by_freq or sparse), ``nn.LayerNorm``, ``nn.GroupNorm``. A model with a trainable parameter
elsewhere (e.g. a ViT's class token), a layer called twice in one forward or a weight used outside its layer is
refused by :func:`bk_problem`, which checks the clipped sum against per-example autograd gradients on two examples.

The clipped sum lands in ``p.grad``, as ghost clipping leaves it, for Opacus's ``DPOptimizerFastGradientClipping``
to add N(0, sigma^2 C^2) and divide by the expected batch size: the same mechanism, so the same accounting.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]


def unsupported_layer(model: nn.Module, limit: int = 3) -> str | None:
    """The modules owning a trainable parameter that book-keeping cannot handle, or None: the first ``limit`` by
    name, each with why (for a module outside :data:`SUPPORTED`, the parameters it holds directly, e.g. a ViT's
    ``cls_token, pos_embedding``), and how many more; joined with ``; ``."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not _trainable(module):
            continue
        why = None
        if not isinstance(module, SUPPORTED):
            held = ", ".join(f"{name}.{n}" if name else n for n, _ in _trainable(module))
            why = (f"trainable parameter(s) {held} of {type(module).__name__} sit outside bk's layers "
                   f"({', '.join(t.__name__ for t in SUPPORTED)})")
        elif isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                or isinstance(module.padding, str) and module.padding != "valid"):
            why = "Conv2d with groups, non-zero padding mode or 'same' padding"
        elif isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                                   or module.sparse):
            why = "Embedding with max_norm, scale_grad_by_freq or sparse"
        if why:
            found.append(why if why.startswith("trainable") else f"{name or 'the model'}: {why}")
    if not found:
        return None
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


class BookKeeping:
    """Forward hooks on ``model``'s layers that keep each one's input and output edge; :meth:`clip_backward` then
    computes sum_i min(1, C / ||grad_i||) grad_i into ``p.grad`` from one backward pass of the per-example losses.

    The interface of Opacus's hooks objects that fedsim's DP round uses: ``enable_hooks``, ``disable_hooks``,
    ``cleanup``. Raises ValueError for a model :func:`unsupported_layer` refuses."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        problem = unsupported_layer(model)
        if problem is not None:
            raise ValueError(f"book-keeping clipping: {problem}")
        self.max_grad_norm = max_grad_norm
        self.layers = [m for m in model.modules() if _trainable(m)]
        self.records: list[tuple[nn.Module, Any, Any]] = []
        self.enabled = True
        self.handles = [m.register_forward_hook(self._record) for m in self.layers]
        self.last_norms: Tensor | None = None

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self.enabled and torch.is_grad_enabled():
            self.records.append((module, inputs[0].detach(), get_gradient_edge(output)))

    def enable_hooks(self) -> None:
        self.enabled = True
        self.records.clear()

    def disable_hooks(self) -> None:
        self.enabled = False
        self.records.clear()

    def cleanup(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.records.clear()

    def clip_backward(self, loss_per_example: Tensor) -> Tensor:
        """One backward pass of ``loss_per_example`` (B,) to the recorded layers' outputs; ``p.grad`` (added to, as
        autograd does) gets the clipped sum. Returns the per-example gradient norms (B,). Raises RuntimeError when a
        layer ran twice since the last forward began (its gradient would be split between calls)."""
        records, self.records = self.records, []
        if len({id(m) for m, _, _ in records}) != len(records):
            raise RuntimeError("book-keeping clipping: a layer ran twice in one forward pass (use grad_sample_mode "
                               "hooks)")
        grads = torch.autograd.grad(loss_per_example.sum(), [edge for _, _, edge in records], allow_unused=True)
        bsz = loss_per_example.shape[0]
        parts = []
        for (module, a, _), g in zip(records, grads, strict=True):
            if g is None:
                g = a.new_zeros(())
            parts.append(_LAYER[type(module) if type(module) in _LAYER else _base(module)](module, a, g))
        sq = loss_per_example.new_zeros(bsz, dtype=torch.float32)
        for part in parts:
            sq = sq + part.sq_norms()
        norms = sq.sqrt()
        self.last_norms = norms
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping factor
        for (module, _, _), part in zip(records, parts, strict=True):
            for name, grad in part.clipped_sum(coef).items():
                p = module._parameters[name]
                if p is None or not p.requires_grad:
                    continue
                p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad
        return norms


def _base(module: nn.Module) -> type:
    return next(t for t in SUPPORTED if isinstance(module, t))


class _PerExample:
    """Per-example gradients held explicitly: {param name: (B, *shape)}."""

    def __init__(self, grads: dict[str, Tensor]) -> None:
        self.grads = grads

    def sq_norms(self) -> Tensor:
        return sum(g.flatten(1).pow(2).sum(1) for g in self.grads.values())

    def clipped_sum(self, coef: Tensor) -> dict[str, Tensor]:
        return {n: (coef.to(g.dtype) @ g.flatten(1)).view(g.shape[1:]) for n, g in self.grads.items()}


class _Ghost:
    """A weight gradient sum_t g_t a_t^T per example, never formed: ghost norms, one matmul for the clipped sum.
    ``a`` (B, T, d), ``g`` (B, T, p); ``bias`` whether the layer has a trainable bias (its gradient sum_t g_t)."""

    def __init__(self, a: Tensor, g: Tensor, weight: bool, bias: bool) -> None:
        self.a, self.g, self.weight, self.bias = a, g, weight, bias

    def sq_norms(self) -> Tensor:
        a, g = self.a, self.g
        out = a.new_zeros(a.shape[0])
        if self.weight:
            if a.shape[1] == 1:
                out = out + a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
            else:
                out = out + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        if self.bias:
            out = out + g.sum(1).pow(2).sum(1)
        return out

    def clipped_sum(self, coef: Tensor) -> dict[str, Tensor]:
        cg = (self.g * coef.view(-1, 1, 1)).flatten(0, 1)
        out = {}
        if self.weight:
            out["weight"] = cg.t() @ self.a.flatten(0, 1)
        if self.bias:
            out["bias"] = cg.sum(0)
        return out


def _matrix_grad(a: Tensor, g: Tensor, weight: bool, bias: bool) -> _Ghost | _PerExample:
    """a (B, T, d), g (B, T, p): ghost norms or explicit per-example gradients, whichever costs fewer operations."""
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    if not weight or t * t * (d + p) <= t * d * p:
        return _Ghost(a, g, weight, bias)
    grads = {"weight": torch.bmm(g.transpose(1, 2), a)}
    if bias:
        grads["bias"] = g.sum(1)
    return _PerExample(grads)


def _linear(module: nn.Linear, a: Tensor, g: Tensor) -> _Ghost | _PerExample:
    bsz = a.shape[0]
    a3, g3 = a.reshape(bsz, -1, a.shape[-1]), g.expand(*a.shape[:-1], module.out_features).reshape(bsz, -1,
                                                                                                   module.out_features)
    return _matrix_grad(a3, g3, module.weight.requires_grad,
                        module.bias is not None and module.bias.requires_grad)


def _conv2d(module: nn.Conv2d, a: Tensor, g: Tensor) -> _Ghost | _PerExample:
    """Ghost norms on the unfolded input when T^2 (d + p) <= T d p (few output positions T, e.g. a ResNet's last
    stage); else the per-example weight gradients from ONE grouped convolution backward (the batch as B groups:
    about a plain weight gradient's cost, half of unfold + bmm's on one CPU thread)."""
    bsz, cout = a.shape[0], module.out_channels
    padding = (0, 0) if module.padding == "valid" else tuple(module.padding)
    out_hw = (g.shape[2:] if g.dim() == 4 else None)
    g = g.expand(bsz, cout, *g.shape[2:]) if g.dim() == 4 else None
    weight, bias = module.weight.requires_grad, module.bias is not None and module.bias.requires_grad
    if g is None:  # the layer's output did not reach the loss: a zero gradient
        out_hw = module(a[:1]).shape[2:]
        g = a.new_zeros(bsz, cout, *out_hw)
    t = int(out_hw[0]) * int(out_hw[1])
    d, p = module.weight[0].numel(), cout
    if weight and t * t * (d + p) > t * d * p:
        grads = {"weight": torch.ops.aten.convolution_backward(
            g.reshape(1, bsz * cout, *out_hw), a.reshape(1, bsz * a.shape[1], *a.shape[2:]),
            module.weight.new_empty(bsz * cout, *module.weight.shape[1:]), None, tuple(module.stride), padding,
            tuple(module.dilation), False, (0, 0), bsz, (False, True, False))[1].view(bsz, *module.weight.shape)}
        if bias:
            grads["bias"] = g.sum((2, 3))
        return _PerExample(grads)
    cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    part = _Ghost(cols.transpose(1, 2), g.reshape(bsz, cout, -1).transpose(1, 2), weight, bias)  # (B, T, d), (B, T, p)
    return _ConvGhost(part, module.weight.shape)


class _ConvGhost(_Ghost):
    def __init__(self, part: _Ghost, shape: torch.Size) -> None:
        super().__init__(part.a, part.g, part.weight, part.bias)
        self.shape = shape

    def clipped_sum(self, coef: Tensor) -> dict[str, Tensor]:
        out = super().clipped_sum(coef)
        if "weight" in out:
            out["weight"] = out["weight"].reshape(self.shape)
        return out


class _EmbeddingGrad:
    """Embedding rows: example i's gradient is sum_t g_t e_{id_t}^T; its norm^2 = sum_{t,s} [id_t = id_s] g_t . g_s."""

    def __init__(self, module: nn.Embedding, ids: Tensor, g: Tensor) -> None:
        bsz = ids.shape[0]
        self.module = module
        self.ids = ids.reshape(bsz, -1)
        g = g.expand(*ids.shape, module.embedding_dim).reshape(bsz, -1, module.embedding_dim)
        if module.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            g = g * (self.ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        self.g = g

    def sq_norms(self) -> Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.g.dtype)
        return (same * torch.bmm(self.g, self.g.transpose(1, 2))).sum((1, 2))

    def clipped_sum(self, coef: Tensor) -> dict[str, Tensor]:
        w = self.module.weight
        cg = (self.g * coef.view(-1, 1, 1)).reshape(-1, w.shape[1])
        return {"weight": torch.zeros_like(w).index_add_(0, self.ids.flatten(), cg.to(w.dtype))}


def _embedding(module: nn.Embedding, ids: Tensor, g: Tensor) -> _EmbeddingGrad:
    return _EmbeddingGrad(module, ids, g)


def _affine(x_hat: Tensor, g: Tensor, channel_dims: tuple[int, ...], weight: bool, bias: bool) -> _PerExample:
    """Per-example gradients of an elementwise affine (weight * x_hat + bias) over ``channel_dims`` of (B, ...)."""
    keep = {0, *channel_dims}
    summed = tuple(i for i in range(x_hat.dim()) if i not in keep)
    grads = {}
    if weight:
        grads["weight"] = (x_hat * g).sum(summed) if summed else x_hat * g
    if bias:
        grads["bias"] = g.sum(summed) if summed else g
    return _PerExample(grads)


def _layer_norm(module: nn.LayerNorm, a: Tensor, g: Tensor) -> _PerExample:
    shape = tuple(module.normalized_shape)
    x_hat = F.layer_norm(a, shape, None, None, module.eps)
    g = g.expand_as(x_hat)
    dims = tuple(range(a.dim() - len(shape), a.dim()))
    return _affine(x_hat, g, dims, module.weight is not None and module.weight.requires_grad,
                   module.bias is not None and module.bias.requires_grad)


def _group_norm(module: nn.GroupNorm, a: Tensor, g: Tensor) -> _PerExample:
    x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
    g = g.expand_as(x_hat)
    return _affine(x_hat, g, (1,), module.weight is not None and module.weight.requires_grad,
                   module.bias is not None and module.bias.requires_grad)


_LAYER: dict[type, Any] = {nn.Linear: _linear, nn.Conv2d: _conv2d, nn.Embedding: _embedding,
                           nn.LayerNorm: _layer_norm, nn.GroupNorm: _group_norm}


def brute_force_clipped_sum(model: nn.Module, loss_per_example: Any, x: Tensor, y: Tensor,
                            max_grad_norm: float) -> tuple[list[Tensor], Tensor]:
    """sum_i min(1, C / (||grad_i|| + 1e-6)) grad_i over ``model``'s trainable parameters, one example at a time
    (``loss_per_example(model(x_i), y_i)`` -> (1,)), and the per-example norms (B,): the independent reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_per_example(model(x[i:i + 1]), y[i:i + 1]).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads, strict=True)]
        norm = math.sqrt(sum(float(gr.double().pow(2).sum()) for gr in grads))
        norms.append(norm)
        coef = min(1.0, max_grad_norm / (norm + 1e-6))
        for t, gr in zip(total, grads, strict=True):
            t.add_(gr, alpha=coef)
    return total, torch.tensor(norms)
