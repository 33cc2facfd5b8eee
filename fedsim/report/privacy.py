"""The privacy block of a run (``metrics.json`` key ``privacy``) as text lines for summary.md and report.html.

Every figure appears with its source: Opacus's accountant (what the defense reported) and Google's
dp_accounting, RDP and PLD (:mod:`fedsim.privacy.summary` computes them); central DP states how it
aggregated and how its client sampling was accounted, DP-SGD the distribution of per-client epsilon
over the whole run, DIFF2 its released epsilon four ways and what it means against the server itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_CLIENT_LINES = 12  # longer lists end with "... and N more" (the full list is in metrics.json)


def _eps(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return "inf (no noise)" if math.isinf(value) else f"{value:.3f}"


def central_lines(c: Mapping[str, Any]) -> list[str]:
    """Central DP: epsilon three ways, sigma, q, and the aggregation and sampling statements."""
    return [
        f"central DP (client-level, delta {c.get('delta')}): epsilon after {c.get('rounds')} round(s) "
        f"{_eps(c.get('epsilon'))} (Opacus RDP); dp_accounting RDP {_eps(c.get('epsilon_dp_accounting_rdp'))}, "
        f"PLD {_eps(c.get('epsilon_dp_accounting_pld'))}; sigma {c.get('noise_multiplier')}, "
        f"q {c.get('sample_rate')}",
        f"central DP aggregation: {c.get('aggregation')} ({c.get('aggregation_note')})",
        f"central DP client sampling: {c.get('sampling')}",
    ]


#: How each sample-level DP optimizer is named and accounted (the privacy block's ``dp_sgd.method``).
SAMPLE_DP_NAMES = {
    "dp_sgd": "DP-SGD (sample-level)",
    "dp_sat": "DP-SAT (sample-level; accounted exactly as DP-SGD: its perturbation w + rho g~_prev / |g~_prev| uses "
              "only the previous privatized gradient, post-processing)",
    "dp_sam": "DP-SAM (sample-level; two private gradient queries of noise sigma on one Poisson batch per step, "
              "accounted as one subsampled Gaussian of sigma / sqrt(2) per step)",
}


def dp_sgd_lines(s: Mapping[str, Any]) -> list[str]:
    """DP-SGD / DP-SAT / DP-SAM: the distribution over clients, then one line per client (capped)."""
    method = s.get("method")
    name = SAMPLE_DP_NAMES.get(method if isinstance(method, str) else "dp_sgd", f"{method} (sample-level)")
    lines = [
        f"{name}, each client's epsilon over the whole run ({s.get('clients_reporting')} client(s) "
        f"trained): max {_eps(s.get('epsilon_max'))}, median {_eps(s.get('epsilon_median'))}, min "
        f"{_eps(s.get('epsilon_min'))} (Opacus); dp_accounting max RDP {_eps(s.get('epsilon_dp_accounting_rdp_max'))}, "
        f"PLD {_eps(s.get('epsilon_dp_accounting_pld_max'))}",
    ]
    clients = s.get("clients") or {}
    for pid, c in list(clients.items())[:MAX_CLIENT_LINES]:
        lines.append(f"client {pid}: epsilon {_eps(c.get('epsilon'))} (dp_accounting RDP "
                     f"{_eps(c.get('epsilon_dp_accounting_rdp'))}, PLD {_eps(c.get('epsilon_dp_accounting_pld'))}) "
                     f"after {c.get('rounds_trained')} trained round(s), delta {c.get('delta')}")
    if len(clients) > MAX_CLIENT_LINES:
        lines.append(f"... and {len(clients) - MAX_CLIENT_LINES} more client(s) in metrics.json")
    return lines


def diff2_lines(d: Mapping[str, Any]) -> list[str]:
    """DIFF2: the released epsilon by every accountant, the authors' closed form, and epsilon against the server."""
    target = d.get("target_epsilon")
    return [
        f"DIFF2 (sample-level: one record of one client, delta {d.get('delta')}), released model after "
        f"{d.get('rounds')} round(s) ({d.get('restarts')} restarts, {d.get('differences')} differences, T "
        f"{d.get('restart_period')}): epsilon {_eps(d.get('epsilon'))} (Opacus RDP); dp_accounting RDP "
        f"{_eps(d.get('epsilon_dp_accounting_rdp'))}, PLD {_eps(d.get('epsilon_dp_accounting_pld'))}; exact "
        f"Gaussian composition {_eps(d.get('epsilon_exact'))}; authors' closed-form bound "
        f"{_eps(d.get('epsilon_closed_form'))}" + (f" (target {target:g})" if isinstance(target, int | float) else ""),
        f"DIFF2 noise: sigma1 {d.get('sigma1'):.4g}, sigma2 {d.get('sigma2'):.4g} (z1 {d.get('z1'):.4g}, z2 "
        f"{d.get('z2'):.4g}; n_min {d.get('n_min')}, P {d.get('clients')}), placement {d.get('noise_placement')}; "
        f"{d.get('aggregation')}",
        f"DIFF2 epsilon against the curious server ({d.get('noise_placement')} noise): "
        f"{_eps(d.get('epsilon_vs_server'))} (RDP), PLD {_eps(d.get('epsilon_dp_accounting_pld_vs_server'))}; "
        f"{d.get('against_server_note')}",
    ]


def privacy_lines(privacy: Mapping[str, Any] | None) -> list[str]:
    """All lines for a privacy block; empty without DP."""
    if not isinstance(privacy, Mapping):
        return []
    lines: list[str] = []
    if isinstance(privacy.get("central_dp"), Mapping):
        lines += central_lines(privacy["central_dp"])
    if isinstance(privacy.get("dp_sgd"), Mapping):
        lines += dp_sgd_lines(privacy["dp_sgd"])
    if isinstance(privacy.get("diff2"), Mapping):
        lines += diff2_lines(privacy["diff2"])
    return lines


def privacy_markdown(privacy: Mapping[str, Any] | None) -> list[str]:
    """A ``## Privacy`` section for summary.md (no lines without DP)."""
    lines = privacy_lines(privacy)
    return ["## Privacy", "", *[f"- {line}" for line in lines], ""] if lines else []
