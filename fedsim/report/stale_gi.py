"""The summary.md sentence on the privacy price of ``gi_conversion`` (the rows' keys:
:func:`fedsim.simulation.stale_leakage.round_metrics`)."""

from __future__ import annotations


def summary_line(history: list[dict[str, float]]) -> str | None:
    """One sentence on the privacy price of gi_conversion over a run's rows (None without inversions): how many
    inversions, their cost, and the mean leakage of the estimates beside the blind-guess baseline."""
    rows = [h for h in history if h.get("gi_inversions")]
    if not rows:
        return None
    n = int(sum(h["gi_inversions"] for h in rows))
    seconds = sum(h["gi_seconds"] for h in rows)

    def mean(key: str) -> float | None:
        values = [h[key] for h in rows if key in h]
        return sum(values) / len(values) if values else None

    parts = [f"The server inverted {n} stale update(s) ({seconds:.1f} s); its estimates of the slow clients' data"]
    if mean("gi_psnr") is not None:
        parts.append(f" are {mean('gi_psnr'):.2f} dB from the nearest real image on average (blind gray image "
                     f"{mean('gi_psnr_blind'):.2f} dB; best estimate {max(h['gi_psnr_best'] for h in rows):.2f} dB),")
    parts.append(f" with label shares overlapping the client's by {mean('gi_label_acc'):.2f} (the privacy price of "
                 "the repair).")
    return "".join(parts)
