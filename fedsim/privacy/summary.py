"""A run's privacy block, and the flat epsilon fields every summary reports: ONE place computes them.

``fedsim run`` writes :func:`privacy_summary` into ``metrics.json`` (key ``privacy``); the bench's cell
summary (``fedsim.bench.store.summarize_run``) and the report (``fedsim.report.loading``) both read it
through :func:`epsilon_fields`, so the leaderboard, ``cells.jsonl`` and ``report.html`` cannot drift.

Inputs are what a run records:

* ``history``: the server's per-round rows; central DP adds ``epsilon``, ``delta``, ``noise_multiplier``
  and ``sample_rate`` (clients per round / clients) after every round.
* ``client_metrics``: ``{round: {partition id: metrics}}``; DP-SGD clients report ``epsilon`` (cumulative
  over the rounds they trained, from Opacus's configured accountant), ``delta``, ``noise_multiplier``,
  ``sample_rate`` and ``steps`` of the round. A client that skipped a round composed nothing in it.

Per-client epsilon is the client's epsilon after the LAST round it trained (its whole run), never the
last round's participants only. Each client's history ``[(sigma, q, steps) per trained round]`` is
re-accounted with Google's ``dp_accounting`` (RDP and PLD), beside the figure the client reported.

DIFF2 (``diff2_*`` keys in the server's rows: noise multipliers z1, z2, restart and difference counts, n_min,
P, placement) is re-accounted by :func:`diff2_summary` (:mod:`fedsim.privacy.diff2`): Opacus RDP,
dp_accounting RDP and PLD, the exact Gaussian composition and the authors' closed-form bound, for what the
server releases, and epsilon against the curious server itself for the noise placement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

from fedsim.privacy import diff2 as diff2_math
from fedsim.privacy.accounting import dp_accounting_epsilon

CENTRAL_AGGREGATION = "uniform"
CENTRAL_AGGREGATION_NOTE = ("uniform mean of the clipped updates (not weighted by num-examples): the noise "
                            "std sigma*C/K that Flower adds is calibrated to it")
FIXED_SIZE_NOTE = ("clients are drawn K of N without replacement each round; epsilon accounts each round as "
                   "Poisson sampling with q = K/N (McMahan et al. 2018), the customary approximation")
FULL_PARTICIPATION_NOTE = "every client every round (q = 1): no sampling, no approximation"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _both(history: list[tuple[float, float, int]] | None, delta: float | None) -> dict[str, float | None]:
    """dp_accounting's RDP and PLD epsilon of a history (None when the history or delta is unknown)."""
    if not history or delta is None:
        return {"epsilon_dp_accounting_rdp": None, "epsilon_dp_accounting_pld": None}
    return {"epsilon_dp_accounting_rdp": dp_accounting_epsilon(history, delta, "rdp"),
            "epsilon_dp_accounting_pld": dp_accounting_epsilon(history, delta, "pld")}


def central_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Central DP's client-level epsilon after the last round that reports one, re-accounted; or None."""
    rows = [h for h in history if _number(h.get("epsilon")) is not None]
    if not rows:
        return None
    row = rows[-1]
    rounds, delta = int(row.get("round", len(rows))), _number(row.get("delta"))
    sigma, q = _number(row.get("noise_multiplier")), _number(row.get("sample_rate"))
    steps = [(sigma, q, rounds)] if sigma is not None and q is not None else None
    return {
        "level": "client", "rounds": rounds, "delta": delta, "noise_multiplier": sigma, "sample_rate": q,
        "epsilon": float(row["epsilon"]), **_both(steps, delta),
        "aggregation": CENTRAL_AGGREGATION, "aggregation_note": CENTRAL_AGGREGATION_NOTE,
        "sampling": None if q is None else (FULL_PARTICIPATION_NOTE if q >= 1 else FIXED_SIZE_NOTE),
    }


def _by_client(client_metrics: Mapping[Any, Mapping[Any, Mapping[str, Any]]]) -> dict[int, list[tuple[int, Mapping]]]:
    """{partition id: [(round, metrics), ...] in round order} for the clients that reported ``epsilon``."""
    out: dict[int, list[tuple[int, Mapping]]] = {}
    for rnd, per in client_metrics.items():
        for pid, m in (per or {}).items():
            if isinstance(m, Mapping) and _number(m.get("epsilon")) is not None:
                out.setdefault(int(pid), []).append((int(rnd), m))
    return {p: sorted(rows, key=lambda r: r[0]) for p, rows in sorted(out.items())}


def client_summary(rows: list[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """One DP-SGD client over the whole run: its final epsilon and its history re-accounted."""
    last = rows[-1][1]
    history = []
    for _, m in rows:
        sigma, q, steps = (_number(m.get(k)) for k in ("noise_multiplier", "sample_rate", "steps"))
        if sigma is None or q is None or steps is None:
            history = None  # an older run without the history fields: only the reported figure
            break
        history.append((sigma, q, int(steps)))
    delta = _number(last.get("delta"))
    return {"epsilon": float(last["epsilon"]), "delta": delta, "rounds_trained": len(rows),
            "last_round": rows[-1][0], **_both(history, delta)}


#: A per-round client metric only that DP-SGD variant reports -> the variant (plain DP-SGD reports neither).
SAMPLE_DP_VARIANTS = {"query_noise_multiplier": "dp_sam", "cos_prev_grad": "dp_sat"}


def sample_dp_method(client_metrics: Mapping[Any, Mapping[Any, Mapping[str, Any]]]) -> str:
    """``dp_sgd``, ``dp_sat`` or ``dp_sam``: which sample-level DP optimizer the clients ran (from their metrics)."""
    keys = {k for per in client_metrics.values() for m in (per or {}).values() if isinstance(m, Mapping) for k in m}
    return next((method for key, method in SAMPLE_DP_VARIANTS.items() if key in keys), "dp_sgd")


def dp_sgd_summary(client_metrics: Mapping[Any, Mapping[Any, Mapping[str, Any]]]) -> dict[str, Any] | None:
    """Sample-level (DP-SGD) epsilon per client over the whole run and its distribution; None without it."""
    clients = {p: client_summary(rows) for p, rows in _by_client(client_metrics).items()}
    if not clients:
        return None
    out: dict[str, Any] = {"level": "sample", "method": sample_dp_method(client_metrics),
                           "clients_reporting": len(clients)}
    modes = sorted({k.split("/", 1)[1] for per in client_metrics.values() for m in (per or {}).values()
                    if isinstance(m, Mapping) for k in m if str(k).startswith("grad_sample_mode/")})
    if modes:  # what ran (grad_sample_mode auto resolves per model: fedsim.defenses.dp_modes)
        out["grad_sample_mode"] = ", ".join(modes)
    for key in ("epsilon", "epsilon_dp_accounting_rdp", "epsilon_dp_accounting_pld"):
        values = _finite([_number(c[key]) for c in clients.values()])  # inf (sigma = 0) stays: it is the max
        if values:
            out[f"{key}_max"] = max(values)
        if key == "epsilon" and values:
            out.update(epsilon_min=min(values), epsilon_median=float(median(values)))
    out["clients"] = {str(p): c for p, c in clients.items()}
    return out


DIFF2_PLACEMENTS = ("central", "distributed", "local")  # fedsim.defenses.diff2.PLACEMENTS: the rows carry the index
DIFF2_AGAINST_SERVER = {  # (placement, SecAgg+): what the curious server sees, hence its epsilon
    ("central", False): "inf: the server adds the noise after averaging, so it sees every client's un-noised message",
    ("central", True): "inf: the server adds the noise after the SecAgg+ aggregation, so it sees the un-noised "
                       "aggregate (no client's message alone, but the mean the noise was meant to hide)",
    ("distributed", True): "the released epsilon: the server sees only the SecAgg+ aggregate, which carries the "
                           "whole noise",
    ("local", False): "each client's own noised message, sensitivity 2C/n_p, noise std sqrt(P) C sigma: z = sqrt(P) "
                      "sigma n_p / 2 (the worst client, n_p = n_min, shown)",
    ("local", True): "the released epsilon: the server sees only the SecAgg+ aggregate of the noised messages, which "
                     "carries every client's share (noise at least the released one, sensitivity 2C/sum n_p)",
}


def diff2_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """DIFF2's record-level epsilon after the last round that reports one, every accountant; or None."""
    rows = [h for h in history if _number(h.get("diff2_z1")) is not None]
    if not rows:
        return None
    row = rows[-1]
    z1, z2, delta = float(row["diff2_z1"]), float(row["diff2_z2"]), float(row["diff2_delta"])
    restarts, differences = int(row["diff2_restarts"]), int(row["diff2_differences"])
    n_min, clients = int(row["diff2_n_min"]), int(row["diff2_clients"])
    placement = DIFF2_PLACEMENTS[int(row["diff2_noise_placement"])]
    secure = placement == "distributed" or bool(_number(row.get("diff2_secure_aggregation")))  # older runs: no key
    released = diff2_math.accounted(z1, z2, restarts, differences, delta)
    alpha = _number(row.get("diff2_alpha"))
    out: dict[str, Any] = {
        "level": "sample", "rounds": int(row.get("round", len(rows))), "delta": delta,
        "restart_period": int(row["diff2_restart_period"]), "restarts": restarts, "differences": differences,
        "sigma1": float(row["diff2_sigma1"]), "sigma2": float(row["diff2_sigma2"]), "z1": z1, "z2": z2,
        "n_min": n_min, "clients": clients, "noise_placement": placement,
        "target_epsilon": _number(row.get("diff2_target_epsilon")), **released,
        "epsilon_closed_form": (diff2_math.closed_form_epsilon(z1, z2, restarts, differences, delta, alpha)
                                if alpha is not None else math.inf),
        "alpha": alpha,
        "aggregation": "uniform mean over the P clients (plain path; SecAgg+: num-examples-weighted, sensitivity "
                       "2C/sum n_p <= 2C/(n_min P)); noise std C1 sigma1 / C2 dx sigma2 on the mean",
        "secure_aggregation": secure,
        "against_server_note": DIFF2_AGAINST_SERVER[placement, secure],
    }
    if placement == "central":
        against = {"epsilon": math.inf, "epsilon_dp_accounting_pld": math.inf, "epsilon_exact": math.inf}
    elif secure:  # distributed, or local shares summed inside SecAgg+: the server sees the noised aggregate only
        against = {k: released[k] for k in ("epsilon", "epsilon_dp_accounting_pld", "epsilon_exact")}
    else:
        local = [diff2_math.local_noise_multiplier(float(row[k]), n_min, clients)
                 for k in ("diff2_sigma1", "diff2_sigma2")]
        against = diff2_math.accounted(*local, restarts, differences, delta)
    out.update({f"{k}_vs_server": v for k, v in against.items() if k != "epsilon_dp_accounting_rdp"})
    return out


def privacy_summary(history: Sequence[Mapping[str, Any]],
                    client_metrics: Mapping[Any, Mapping[Any, Mapping[str, Any]]] | None) -> dict[str, Any]:
    """The ``privacy`` block of metrics.json: ``central_dp`` and/or ``dp_sgd`` (empty without DP)."""
    out: dict[str, Any] = {}
    central = central_summary(history)
    if central is not None:
        out["central_dp"] = central
    sample = dp_sgd_summary(client_metrics or {})
    if sample is not None:
        out["dp_sgd"] = sample
    diff2 = diff2_summary(history)
    if diff2 is not None:
        out["diff2"] = diff2
    return out


def epsilon_fields(privacy: Mapping[str, Any]) -> dict[str, Any]:
    """The flat epsilon fields of a cell summary / leaderboard row, from a privacy block.

    ``epsilon``: central DP's (client-level) when present, else the max over clients of DP-SGD's
    per-client epsilon over the whole run (sample-level), else None; ``epsilon_level`` says which.
    ``epsilon_min`` / ``epsilon_median``: DP-SGD's distribution over clients; ``epsilon_dp_accounting_rdp``
    / ``_pld``: the same headline from dp_accounting. With both defenses, ``epsilon_dp_sgd`` is DP-SGD's max.
    DIFF2 (which combines with no other DP defense): its released epsilon (Opacus RDP, then dp_accounting's),
    sample-level, and ``epsilon_vs_server`` (inf under central noise).
    """
    central, sample = privacy.get("central_dp"), privacy.get("dp_sgd")
    out: dict[str, Any] = {"epsilon": None}
    diff2 = privacy.get("diff2")
    if diff2:  # DIFF2 protects one record of one client in what the server releases (it runs alone)
        return {"epsilon": diff2.get("epsilon"), "epsilon_dp_accounting_rdp": diff2.get("epsilon_dp_accounting_rdp"),
                "epsilon_dp_accounting_pld": diff2.get("epsilon_dp_accounting_pld"), "epsilon_level": "sample",
                "epsilon_vs_server": diff2.get("epsilon_vs_server")}
    if sample:
        out.update(epsilon=sample.get("epsilon_max"), epsilon_min=sample.get("epsilon_min"),
                   epsilon_median=sample.get("epsilon_median"),
                   epsilon_dp_accounting_rdp=sample.get("epsilon_dp_accounting_rdp_max"),
                   epsilon_dp_accounting_pld=sample.get("epsilon_dp_accounting_pld_max"), epsilon_level="sample")
    if central:
        if sample:
            out = {"epsilon_dp_sgd": out["epsilon"]}
        out.update(epsilon=central.get("epsilon"), epsilon_dp_accounting_rdp=central.get("epsilon_dp_accounting_rdp"),
                   epsilon_dp_accounting_pld=central.get("epsilon_dp_accounting_pld"), epsilon_level="client")
    return out


def epsilon_vs_server(summary: Mapping[str, Any]) -> float | None:
    """Epsilon against the curious server itself, from a cell summary / epsilon fields; None without DP.

    The ONE derivation the leaderboard and the DP frontier share: a reported ``epsilon_vs_server`` (DIFF2; None,
    as older strict-JSON stores hold inf, reads as inf: central noise is added after the server saw every
    message); else for sample-level DP the headline ``epsilon`` (DP-SGD's clients noise before sending); else for
    client-level DP inf (central DP's server sees raw updates), or DP-SGD's own ``epsilon_dp_sgd`` when both ran.
    """
    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    if "epsilon_vs_server" in summary:
        value = summary["epsilon_vs_server"]
        return math.inf if value is None else number(value)
    if summary.get("epsilon") is None:
        return None
    if summary.get("epsilon_level") == "sample":
        return number(summary["epsilon"])
    dp_sgd = number(summary.get("epsilon_dp_sgd"))
    return dp_sgd if dp_sgd is not None else math.inf


def run_privacy(stored: Any, history: Sequence[Mapping[str, Any]],
                client_metrics: Mapping[Any, Mapping[Any, Mapping[str, Any]]] | None) -> dict[str, Any]:
    """A run's privacy block: the one it stored (metrics.json ``privacy``), else computed from its records."""
    if isinstance(stored, Mapping):
        return dict(stored)
    return privacy_summary(history, client_metrics)
