"""DIFF2's client half (Murata & Suzuki, ICML 2023; spec algorithms-more.md §9.2, §9.6): the message of one round.

Round r (fedsim's server round ``r + 1``) of client p with partition ``z_1..z_n`` (n = n_p), model x_r:

* restart round (r mod T == 0): ``a_p = (1/n) sum_i clip_C1(grad l(x_r; z_i))``;
* difference round: ``b_p = (1/n) sum_i clip_{C2 dx}(grad l(x_r; z_i) - grad l(x_{r-1}; z_i))`` with
  ``dx = ||x_r - x_{r-1}||_2`` over all trainable parameters;

``clip_C(g) = g min(1, C / ||g||_2)`` per example over the whole parameter vector (None: no clipping). The mean is
the EXACT per-sample mean (one sum over every chunk, divided by n once), not a mean of chunk means (the authors'
code overweights the last chunk of 200; spec §9.9). Per-sample gradients come from ``torch.func``
(``functional_call`` + ``vmap(grad)``), in chunks of ``chunk_size`` examples.

The client remembers the global model it received (x_r) and that round's number in its persistent state
(``TrainingJob.state``, kept per client by Flower's Context on both client paths): a difference round whose
stored model is not from the round before raises (:class:`MissedRoundError`), since DIFF2's estimator
``v_r = v_{r-1} + mean`` is wrong without every client's message every round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.audit.canaries import EXAMPLE_NORM_FACTOR, CanarySet
from fedsim.errors import SimulationError
from fedsim.per_example import clip_per_example, step_norm
from fedsim.training import LossFn, TrainingJob


class MissedRoundError(SimulationError):
    """A DIFF2 difference round on a client that does not hold the previous round's global model."""


def is_restart(server_round: int, restart_period: int) -> bool:
    """fedsim rounds are 1-based: server round 1 is the paper's r = 0, a restart; then every T-th."""
    return (server_round - 1) % restart_period == 0


def clipped_mean_gradient(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, labels: Tensor,
                          loss_fn: LossFn, clip: float | None, chunk_size: int,
                          reference: Mapping[str, Tensor] | None = None,
                          extra: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``(1/n) sum_i clip_C(g_i)`` with ``g_i = grad l(params; z_i)`` (minus ``grad l(reference; z_i)`` when a
    reference model is given); ``clip`` None: no clipping.

    ``extra``: name -> (k, *param shape) per-example gradients of k more records whose gradient is known (the
    audit's canaries), clipped by the same clip as the real ones and added to the sum; the mean still divides by
    n, the partition's real count (a canary replaces a record in DIFF2's neighbouring relation).

    ``model``: the architecture (its buffers are used, its parameters are not); ``params`` / ``reference``: name ->
    tensor of every trainable parameter; ``inputs`` (n, ...) already normalized, ``labels`` (n, ...);
    ``loss_fn(outputs, labels)`` of one example (a batch of one). Returns name -> tensor shaped like the
    parameter. Raises ValueError for n = 0 (the mean of nothing).
    """
    n = len(inputs)
    if n == 0:
        raise ValueError("diff2: the client has no examples (its mean gradient is undefined)")
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_of(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    params = {k: v.detach() for k, v in params.items()}
    ref = None if reference is None else {k: v.detach().to(params[k].device, params[k].dtype)
                                          for k, v in reference.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    chunks: list[dict[str, Tensor] | None] = [None] * len(range(0, n, chunk_size))  # None: computed here
    if extra is not None:
        chunks.append({k: extra[k].detach().to(v.device, v.dtype) for k, v in params.items()})
    for i, known in enumerate(chunks):
        if known is None:
            start = i * chunk_size
            x, y = inputs[start:start + chunk_size], labels[start:start + chunk_size]
            grads = per_sample(params, x, y)
            if ref is not None:
                at_ref = per_sample(ref, x, y)
                grads = {k: g - at_ref[k] for k, g in grads.items()}
        else:
            grads = known
        if clip is not None:
            grads = clip_per_example(grads, clip)
        for k, g in grads.items():
            total[k] += g.sum(0)
    return {k: v / n for k, v in total.items()}


class Diff2ClientRound:
    """One client's DIFF2 round: the :class:`TrainingJob` hooks.

    ``sample_batches``: the whole partition, in order (also what the evaluator scores an attack against);
    ``loss_fn``: the job's loss, which also keeps the labels; a forward pre-hook keeps the normalized inputs;
    ``before_read_gradients``: replaces each ``p.grad`` by the DIFF2 message (fedsgd sends ``p.grad``), and
    stores x_r for the next round. ``on_round(clip)`` is called with the round's clip radius (C1, or C2 dx;
    None when unclipped) so the defense can scale the client's noise share.
    """

    def __init__(self, job: TrainingJob, *, c1: float | None, c2: float | None, restart_period: int,
                 chunk_size: int, state_prefix: str, on_round: Callable[[float | None, float], None],
                 canaries: CanarySet | None = None) -> None:
        self.job, self.model = job, job.model
        self.canaries = canaries
        self.c1, self.c2, self.restart_period, self.chunk_size = c1, c2, restart_period, chunk_size
        self.prefix, self.on_round = state_prefix, on_round
        self.base_loss = job.loss_fn
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None
        self.handle = self.model.register_forward_pre_hook(self._keep_inputs)

    # -- TrainingJob hooks ----------------------------------------------------------------------------
    def sample_batches(self, n: int, local: Any, protocol: str, gen: torch.Generator) -> list[Tensor]:
        return [torch.arange(n)]

    def loss_fn(self, outputs: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        self.labels = labels
        return self.base_loss(outputs, labels, **kwargs)

    def before_read_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self.handle.remove()
        if self.inputs is None or self.labels is None:
            raise RuntimeError("diff2: the round's inputs were not seen (the model was not called on the batch)")
        rnd = self.job.round
        names = [k for k, p in self.model.named_parameters() if p.requires_grad]
        params = dict(self.model.named_parameters())
        current = {k: params[k].detach() for k in names}
        if is_restart(rnd, self.restart_period):
            clip, reference, dx = self.c1, None, 0.0
        else:
            reference = self._previous(rnd, names)
            dx = step_norm(current, reference, names)
            clip = None if self.c2 is None else self.c2 * dx
        # audit: the replace-one canaries join a restart round's per-example gradients before the clip to C1 (a
        # difference round: none, a constant gradient has zero differences)
        extra = self.canary_rows() if reference is None else None
        message = clipped_mean_gradient(self.model, current, self.inputs, self.labels, self.base_loss, clip,
                                        self.chunk_size, reference, extra)
        for k in names:
            params[k].grad = message[k]
        if self.restart_period > 1:  # the next round may be a difference round: remember x_r
            for k in names:
                self.job.state[f"{self.prefix}/model/{k}"] = current[k].detach().cpu().clone()
            self.job.state[f"{self.prefix}/model-round"] = str(rnd)
        self.on_round(clip, dx)

    # -- helpers ---------------------------------------------------------------------------------------
    def canary_rows(self) -> dict[str, Tensor] | None:
        """The per-example gradients of this client's audit canaries in a restart round (name -> (k, *shape)), or
        None without example canaries.

        DIFF2's neighbours replace one record, so every canary of the client is a record of its partition, in
        one of two versions: gradient ``+F C1 c_j`` (included) or ``-F C1 c_j`` (left out), a linear loss whose
        per-example gradient is that constant, of norm F C1 ABOVE the clip (F =
        :data:`~fedsim.audit.canaries.EXAMPLE_NORM_FACTOR`, :meth:`~fedsim.audit.canaries.CanarySet.signed_rows`).
        They join the real records' per-example gradients before ``clip_C1``, so DIFF2's own clipping brings each
        to C1 and the mean over the n records of the partition gains ``s_j C1 c_j / n``. Before any noise: the
        local and distributed shares come after it (``transform_update``), the central noise on the server. A
        constant gradient has zero differences, so difference rounds add nothing (their clip to C2 dx is not
        exercised). ``c1`` null (no clipping, zero noise only): rows of norm 1.0, left as they are.
        """
        if self.canaries is None:
            return None
        norm = 1.0 if self.c1 is None else EXAMPLE_NORM_FACTOR * self.c1
        rows = self.canaries.signed_rows(self.job.partition_id, norm)
        return None if rows is None else self.canaries.as_rows(rows)

    def _keep_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.inputs = args[0].detach()

    def _previous(self, rnd: int, names: list[str]) -> dict[str, Tensor]:
        """x_{r-1} from the client's state; MissedRoundError when it is missing or from another round."""
        held = self.job.state.get(f"{self.prefix}/model-round")
        if held != str(rnd - 1) or any(f"{self.prefix}/model/{k}" not in self.job.state for k in names):
            had = "none" if held is None else f"round {held}'s"
            raise MissedRoundError(
                f"diff2: difference round {rnd} needs the global model of round {rnd - 1}, but client "
                f"{self.job.partition_id} holds {had} (it missed round {rnd - 1}): DIFF2's estimator "
                "v_r = v_(r-1) + mean needs every client's message every round")
        return {k: self.job.state[f"{self.prefix}/model/{k}"] for k in names}  # type: ignore[misc]
