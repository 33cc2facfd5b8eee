"""Tutorial step 8's run and figure: ``scenarios/tutorial/08_stale_updates.yaml`` run once (run directory with
report.html), and ``docs/figures/tutorial_08_estimates.png``: the server's estimate of slow client 5's data at its
last inversion (top) beside 16 of the client's real images (bottom), each estimate captioned with its label.

    OMP_NUM_THREADS=1 python benchmarks/stale_gi_figure.py [--out runs/tutorial-08] [--figure PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402
from fedsim.simulation import staleness as stale_rules  # noqa: E402
from fedsim.simulation.setup import setup_for  # noqa: E402
from fedsim.simulation.stale_leakage import score_estimate  # noqa: E402

CLIENT = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tutorial-08")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "tutorial_08_estimates.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenario = load_scenario(ROOT / "scenarios" / "tutorial" / "08_stale_updates.yaml")
    rule, records = stale_rules.STALE_RULES["gi_conversion"], []

    def keep(arrival, scen):  # noqa: ANN001, ANN202 - the rule's own signature
        out = rule(arrival, scen)
        if arrival.partition_id == CLIENT and "estimate_record" in arrival.memory:
            records.append(arrival.memory["estimate_record"])
        return out

    stale_rules.STALE_RULES["gi_conversion"] = keep
    try:
        result = run_scenario(scenario, args.out, overwrite=True)
    finally:
        stale_rules.STALE_RULES["gi_conversion"] = rule
    last = records[-1]
    real_x, real_y = setup_for(scenario).client_data(CLIENT)
    score = score_estimate(last, real_x, real_y)
    n = len(last.pixels)
    fig, axes = plt.subplots(2, n, figsize=(n * 0.6, 1.6))
    for i in range(n):
        axes[0, i].imshow(last.pixels[i, 0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(str(int(last.soft_labels[i].argmax())), fontsize=6, pad=1)
        axes[1, i].imshow(real_x[i, 0], cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"server's estimate of client {CLIENT}'s data, round {last.round} (top; PSNR to nearest real "
                 f"{score['psnr']:.1f} dB, best blind guess {score['psnr_trivial']:.1f} dB) / its real images (bottom)",
                 fontsize=6)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110, bbox_inches="tight")
    history = result.history
    acc = [h["test_accuracy_class5"] for h in history if "test_accuracy_class5" in h]
    rows = [h for h in history if h.get("gi_inversions")]
    print(f"class-5 accuracy (rounds 61-80 mean) {100 * sum(acc[-20:]) / 20:.1f}%, overall "
          f"{100 * history[-1]['test_accuracy']:.1f}%; {sum(h['gi_inversions'] for h in rows):.0f} inversions in "
          f"{sum(h['gi_seconds'] for h in rows):.0f} s; estimates PSNR "
          f"{sum(h['gi_psnr'] for h in rows) / len(rows):.2f}"
          f" dB (best blind guess {sum(h['gi_psnr_trivial'] for h in rows) / len(rows):.2f}), label overlap "
          f"{sum(h['gi_label_acc'] for h in rows) / len(rows):.2f}; figure's estimate {score}")
    for outcome in result.outcomes:
        print("attack", outcome.attack, outcome.round, outcome.partition_id, outcome.failed, outcome.metrics)
    print(f"run dir {result.out_dir}; timing {result.timing}")


if __name__ == "__main__":
    main()
