"""The canaries of one audited run: directions, in/out coins, who holds each, and the shifts the federation adds.

A canary j is a unit vector c_j over the model's trainable parameters (flattened in ``named_parameters`` order),
drawn from the scenario's seed, so every process (client actors, the server, the evaluator) rebuilds the same set
from the scenario alone. Its coin ``included[j]`` (probability 1/2, Steinke et al. 2023) is ground truth: only the
federation's canary hooks and the evaluator read it, never an attack.

* ``example`` level: canary j is a record of client ``j mod clients`` whose loss is linear, so its per-example
  gradient is a constant along c_j whatever the model. An included canary joins each batch of its client with the
  batch's ACCOUNTED rate q, drawn from the seed (:meth:`CanarySet.example_drawn`), not by the real batch sampler:
  the audit takes the sampler's Poisson rate as given. Its gradient enters as a per-example gradient of norm
  ``EXAMPLE_NORM_FACTOR x C`` (:meth:`CanarySet.example_rows`), ABOVE the clipping norm C, appended to the real
  records' per-example gradients before the mechanism clips them, so the mechanism's own clipping must bring it
  down to C: a clip that does not clip, or a clip norm other than the accounted C, moves the model by more than
  the accountant assumes, and the audit can see it. Ghost clipping has no per-example gradients to append to: its
  canaries (:meth:`CanarySet.example_shift`, ``C c_j`` each) join the clipped sum after the clipping, which they
  therefore do not exercise (``canaries_clipped_by_mechanism: false`` in the audit block). DIFF2's replace-one
  neighbours use :meth:`CanarySet.signed_rows` instead: every canary is present, with gradient ``+F C1 c_j`` (in)
  or ``-F C1 c_j`` (out) before DIFF2's clip to C1; its gradient differences are 0.
* ``client`` level (:mod:`fedsim.audit.client_canaries`): canary j is an honest client whose update is
  ``norm c_j``, norm = 10 x the round's clipping norm (``audit.client_norm`` overrides); an included one takes part
  in a round with the clients' rate q = K/N and its reply joins the real replies BEFORE the server's clipping,
  weighting and noise, so it is clipped to C and weighted like any client (1 / (K + k) of the uniform mean).

:meth:`CanarySet.scores` is Andrew et al.'s statistic: the cosine between c_j and the released model's change.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from fedsim.errors import ScenarioError
from fedsim.scenario import Scenario
from fedsim.seeding import numpy_rng, torch_generator

CACHE_FLOATS = 30_000_000  # directions kept in memory up to this many floats (120 MB); regenerated beyond
#: an example canary's per-example gradient has norm EXAMPLE_NORM_FACTOR x C before the mechanism clips it to C
EXAMPLE_NORM_FACTOR = 10.0


def audit_level(scenario: Scenario) -> str | None:
    """``example`` or ``client`` for a scenario with an ``audit:`` block (``auto`` resolved), else None.

    ``auto`` is ``example`` when a defense gives sample-level DP inside the clients (``Defense.audits_examples``:
    dp_sgd, dp_sat, dp_sam, diff2), else ``client``.
    """
    spec = scenario.audit
    if spec is None:
        return None
    if spec.level != "auto":
        return spec.level
    from fedsim.simulation.setup import setup_for

    return "example" if any(getattr(d, "audits_examples", False) for d in setup_for(scenario).defenses) else "client"


class CanarySet:
    """The ``m`` canaries of ``scenario`` at ``level`` over the trainable parameters ``shapes`` (name -> shape)."""

    def __init__(self, scenario: Scenario, level: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if scenario.audit is None:
            raise ScenarioError("audit", "the scenario has no audit block")
        self.scenario, self.level = scenario, level
        self.m = scenario.audit.canaries
        self.names = list(shapes)
        self.shapes = [tuple(s) for s in shapes.values()]
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes]
        self.dim = int(sum(self.sizes))
        #: ground truth: canary j is in the run (+) or left out (-)
        self.included = numpy_rng(scenario.seed, "audit", "coins").random(self.m) < 0.5
        self._cache: dict[int, Tensor] = {}

    # -- who holds what ---------------------------------------------------------------------------
    def owner(self, j: int) -> int:
        """Partition id holding example canary j (round robin over the clients)."""
        return j % self.scenario.federation.clients

    def of_client(self, pid: int) -> list[int]:
        """Example canaries held by client ``pid`` (in and out)."""
        return list(range(pid, self.m, self.scenario.federation.clients))

    # -- directions -------------------------------------------------------------------------------
    def direction(self, j: int) -> Tensor:
        """c_j: a unit vector of ``dim`` float32 values, the same in every process."""
        if j in self._cache:
            return self._cache[j]
        gen = torch_generator(self.scenario.seed, "audit", "direction", j)
        vec = torch.randn(self.dim, generator=gen)
        vec /= vec.norm()
        if (len(self._cache) + 1) * self.dim <= CACHE_FLOATS:
            self._cache[j] = vec
        return vec

    def combination(self, weights: Mapping[int, float]) -> Tensor | None:
        """``sum_j w_j c_j`` over ``weights`` (canary -> weight), or None when it is empty."""
        if not weights:
            return None
        out = torch.zeros(self.dim)
        for j, w in weights.items():
            out.add_(self.direction(j), alpha=float(w))
        return out

    def as_state(self, vec: Tensor) -> dict[str, Tensor]:
        """A flat (dim,) vector as {parameter name: tensor of its shape}."""
        parts = torch.split(vec, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def as_rows(self, rows: Tensor) -> dict[str, Tensor]:
        """(k, dim) rows as {parameter name: (k, *its shape)}: per-example gradients in Opacus's layout."""
        parts = torch.split(rows, self.sizes, dim=1)
        return {n: p.reshape(len(rows), *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        """The trainable parameters of a state dict as one float32 (dim,) vector (the canaries' space)."""
        return torch.cat([state[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names])

    # -- what the federation adds -----------------------------------------------------------------
    def example_drawn(self, pid: int, server_round: int, step: int, q: float) -> list[int]:
        """Client ``pid``'s INCLUDED example canaries drawn into batch ``step`` of ``server_round``: each of its
        canaries with probability q (the accounted sampling rate), from the seed labels
        ``(seed, "audit", "sample", server_round, pid, step)``."""
        gen = numpy_rng(self.scenario.seed, "audit", "sample", server_round, pid, step)
        mine = self.of_client(pid)
        drawn = gen.random(len(mine)) < q
        return [j for j, d in zip(mine, drawn, strict=True) if d and self.included[j]]

    def rows(self, weights: Mapping[int, float]) -> Tensor | None:
        """``(k, dim)``: row i is ``w_i c_{j_i}`` over ``weights`` (canary -> weight, in order), or None if empty."""
        if not weights:
            return None
        return torch.stack([self.direction(j) * float(w) for j, w in weights.items()])

    def example_rows(self, pid: int, server_round: int, step: int, q: float, norm: float) -> Tensor | None:
        """The per-example gradients of client ``pid``'s canaries in batch ``step`` of ``server_round``: (k, dim),
        row ``norm c_j`` for each canary of :meth:`example_drawn`; None when none is drawn. The caller passes
        ``norm = EXAMPLE_NORM_FACTOR x C`` and appends the rows to the real records' per-example gradients
        before the mechanism's clipping."""
        return self.rows({j: norm for j in self.example_drawn(pid, server_round, step, q)})

    def example_shift(self, pid: int, server_round: int, step: int, q: float, norm: float) -> Tensor | None:
        """What the same canaries add to a clipped gradient SUM when the clipping cannot be reached (ghost
        clipping): ``norm * sum c_j`` over :meth:`example_drawn`, ``norm`` = C. None when none is drawn."""
        return self.combination({j: norm for j in self.example_drawn(pid, server_round, step, q)})

    def signed_rows(self, pid: int, norm: float) -> Tensor | None:
        """Replace-one canaries (DIFF2): (k, dim) per-example gradients ``s_j norm c_j`` over client ``pid``'s
        canaries, s_j = +1 when included, -1 when not: every canary is a record of the client, in one of two
        versions. None when the client holds none."""
        return self.rows({j: (norm if self.included[j] else -norm) for j in self.of_client(pid)})

    # -- what the evaluator reads -----------------------------------------------------------------
    @cached_property
    def movement_sign(self) -> float:
        """+1 when a canary moves the model along +c_j (client canaries under fedavg add a model delta), -1
        when it moves it against c_j (a gradient, stepped against: example canaries, client canaries under fedsgd)."""
        fedavg = self.scenario.federation.protocol == "fedavg"
        return 1.0 if self.level == "client" and fedavg else -1.0

    def scores(self, initial: Mapping[str, Tensor], final: Mapping[str, Tensor]) -> np.ndarray:
        """(m,) cosines between each c_j and the released model's change ``final - initial`` (signed so that an
        included canary is expected to score higher): Andrew et al.'s statistic on the final model."""
        change = self.movement_sign * (self.flatten(final) - self.flatten(initial))
        norm = float(change.norm())
        out = np.zeros(self.m)
        if norm == 0:
            return out
        for j in range(self.m):
            out[j] = float(self.direction(j) @ change) / norm
        return out


_SETS: dict[str, CanarySet | None] = {}


def canaries_for(scenario: Scenario) -> CanarySet | None:
    """The scenario's canaries (cached per process), or None without an ``audit:`` block."""
    key = scenario.model_dump_json()
    if key not in _SETS:
        level = audit_level(scenario)
        if level is None:
            _SETS[key] = None
        else:
            from fedsim.simulation.setup import setup_for

            model = setup_for(scenario).build_model()
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
            _SETS.clear()
            _SETS[key] = CanarySet(scenario, level, shapes)
    return _SETS[key]
