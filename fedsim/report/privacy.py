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


def requested_mode(defenses: Any) -> str | None:
    """The ``grad_sample_mode`` the scenario's DP-SGD-family defense asks for (``defenses``: scenario.yaml's list of
    dicts, or :class:`fedsim.scenario.DefenseSpec` objects); ``auto`` (the default) when its params omit it; None
    without such a defense."""
    for d in defenses or []:
        name, params = (d.get("name"), d.get("params")) if isinstance(d, Mapping) else (d.name, d.params)
        if name in SAMPLE_DP_NAMES:
            return str((params or {}).get("grad_sample_mode", "auto"))
    return None


def mode_text(ran: Any, requested: str | None) -> str | None:
    """``auto -> bk``: the mode that ran (the privacy block's ``grad_sample_mode``), after the requested one when
    they differ; None when the run recorded none."""
    if not isinstance(ran, str) or not ran:
        return None
    return f"{requested} \u2192 {ran}" if requested and requested != ran else ran


def dp_sgd_lines(s: Mapping[str, Any], requested: str | None = None) -> list[str]:
    """DP-SGD / DP-SAT / DP-SAM: the distribution over clients, the per-example gradient mode that ran (after the
    ``requested`` setting, e.g. ``auto -> bk``), then one line per client (capped)."""
    method = s.get("method")
    name = SAMPLE_DP_NAMES.get(method if isinstance(method, str) else "dp_sgd", f"{method} (sample-level)")
    lines = [
        f"{name}, each client's epsilon over the whole run ({s.get('clients_reporting')} client(s) "
        f"trained): max {_eps(s.get('epsilon_max'))}, median {_eps(s.get('epsilon_median'))}, min "
        f"{_eps(s.get('epsilon_min'))} (Opacus); dp_accounting max RDP {_eps(s.get('epsilon_dp_accounting_rdp_max'))}, "
        f"PLD {_eps(s.get('epsilon_dp_accounting_pld_max'))}",
    ]
    mode = mode_text(s.get("grad_sample_mode"), requested)
    if mode:  # what ran: auto picks per model (fedsim.defenses.dp_modes); the same clipping and noise, any mode
        lines.append(f"per-example gradients (grad_sample_mode): {mode}")
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


def privacy_lines(privacy: Mapping[str, Any] | None, defenses: Any = None) -> list[str]:
    """All lines for a privacy block; empty without DP. ``defenses``: the scenario's (for the requested
    ``grad_sample_mode`` beside the one that ran)."""
    if not isinstance(privacy, Mapping):
        return []
    lines: list[str] = []
    if isinstance(privacy.get("central_dp"), Mapping):
        lines += central_lines(privacy["central_dp"])
    if isinstance(privacy.get("dp_sgd"), Mapping):
        lines += dp_sgd_lines(privacy["dp_sgd"], requested_mode(defenses))
    if isinstance(privacy.get("diff2"), Mapping):
        lines += diff2_lines(privacy["diff2"])
    return lines


def privacy_markdown(privacy: Mapping[str, Any] | None, defenses: Any = None) -> list[str]:
    """A ``## Privacy`` section for summary.md (no lines without DP); ``defenses`` as for :func:`privacy_lines`."""
    lines = privacy_lines(privacy, defenses)
    return ["## Privacy", "", *[f"- {line}" for line in lines], ""] if lines else []
