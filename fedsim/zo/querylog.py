"""One client's record of its black-box queries: points, values and per-phase counts (spec §11.2, §11.5).

The FZooS client keeps its whole history ``H_i`` (the GP and RFF fits use the points nearest the current iterate);
the finite-difference baselines keep only a few recent points. A point already in the record is answered from it
and not queried (or counted) again: the black boxes are deterministic, so this only removes duplicate queries (the
authors query the broadcast point up to three times per round: safeguard, refresh, next round's start).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsim.zo.api import ClientFunction

PHASES = ("init", "train", "refresh", "values")
"""Query phases: FZooS's initial exploration, the local round, the surrogate / control-variate refresh, and the
safeguard's value replies."""


class QueryLog:
    """Points ``X`` (N, d) float64, values ``y`` (N,), and cumulative query ``counts`` per phase.

    Args:
        f: the client's black box.
        dim: d.
        keep: the number of most recent points kept (``None``: all).
        X, y, counts: a restored record (see :meth:`state`).
    """

    def __init__(self, f: ClientFunction, dim: int, keep: int | None = None, X: Tensor | None = None,
                 y: Tensor | None = None, counts: Tensor | None = None) -> None:
        self.f, self.dim, self.keep = f, int(dim), keep
        self.X = torch.zeros(0, self.dim, dtype=torch.float64) if X is None else X.to(torch.float64).clone()
        self.y = torch.zeros(0, dtype=torch.float64) if y is None else y.to(torch.float64).reshape(-1).clone()
        if self.X.shape != (self.y.shape[0], self.dim):
            raise ValueError(f"query record: X {tuple(self.X.shape)} and y {tuple(self.y.shape)} do not match d="
                             f"{self.dim}")
        c = torch.zeros(len(PHASES), dtype=torch.int64) if counts is None else counts.to(torch.int64).reshape(-1)
        self.counts = {p: int(c[i]) for i, p in enumerate(PHASES)}
        self._index = {self._key(row): i for i, row in enumerate(self.X)}

    @staticmethod
    def _key(row: Tensor) -> bytes:
        return row.contiguous().numpy().tobytes()

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def count(self, phase: str, n: int) -> None:
        """Count ``n`` queries made outside :meth:`query` (e.g. finite-difference probes)."""
        self.counts[phase] += int(n)

    def evaluate(self, xs: Tensor, phase: str) -> Tensor:
        """Query ``xs`` (k, d) without recording the points (counted): the finite-difference probes."""
        xs = torch.as_tensor(xs, dtype=torch.float64).reshape(-1, self.dim)
        self.count(phase, xs.shape[0])
        return self._call(xs)

    def _call(self, rows: Tensor) -> Tensor:
        """One call of the black box on ``rows`` (k, d) -> (k,) float64. Raises ``ValueError`` naming the black box
        when it returns the wrong count or a NaN / inf (a GP fitted on it would fail with the library's text)."""
        vals = torch.as_tensor(self.f(rows), dtype=torch.float64).reshape(-1)
        if vals.shape[0] != rows.shape[0]:
            raise ValueError(f"the client function returned {vals.shape[0]} values for {rows.shape[0]} points")
        bad = (~torch.isfinite(vals)).nonzero()
        if bad.numel():
            j = int(bad[0])
            raise ValueError(f"the black box f_i returned a non-finite value ({float(vals[j])}) at a queried point "
                             f"(x[:3] = {[round(float(v), 4) for v in rows[j, :3]]}); its values must be finite")
        return vals

    def query(self, xs: Tensor, phase: str) -> Tensor:
        """Values at ``xs`` (k, d) -> (k,): recorded points are answered from the record, the others are queried in
        one call of ``f`` (counted under ``phase``) and recorded."""
        if phase not in self.counts:
            raise ValueError(f"unknown query phase {phase!r} (expected one of {PHASES})")
        xs = torch.as_tensor(xs, dtype=torch.float64).reshape(-1, self.dim).contiguous()
        keys = [self._key(r) for r in xs]
        new: dict[bytes, int] = {}
        for k, row_i in zip(keys, range(xs.shape[0]), strict=True):
            if k not in self._index and k not in new:
                new[k] = row_i
        if new:
            rows = xs[list(new.values())]
            vals = self._call(rows)
            self.count(phase, rows.shape[0])
            start = len(self)
            self.X = torch.cat([self.X, rows])
            self.y = torch.cat([self.y, vals])
            for j, k in enumerate(new):
                self._index[k] = start + j
        out = torch.stack([self.y[self._index[k]] for k in keys])
        self._trim()
        return out

    def _trim(self) -> None:
        if self.keep is not None and len(self) > self.keep:
            self.X, self.y = self.X[-self.keep:].clone(), self.y[-self.keep:].clone()
            self._index = {self._key(row): i for i, row in enumerate(self.X)}

    def nearest(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` recorded points nearest ``x`` (d,) in Euclidean distance (ties: earlier first), and values."""
        if len(self) == 0:
            raise ValueError("no queries recorded yet")
        d = torch.cdist(x.reshape(1, -1).to(torch.float64), self.X, compute_mode="donot_use_mm_for_euclid_dist")[0]
        idx = torch.argsort(d, stable=True)[:k]
        return self.X[idx], self.y[idx]

    def state(self) -> dict[str, Tensor]:
        """``{"X", "y", "counts"}`` as tensors (counts in :data:`PHASES` order)."""
        return {"X": self.X.clone(), "y": self.y.clone(),
                "counts": torch.tensor([self.counts[p] for p in PHASES], dtype=torch.int64)}
