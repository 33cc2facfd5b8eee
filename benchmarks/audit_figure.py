"""Tutorial step 11's figure: the canary scores of one-run audits, ``docs/figures/tutorial_11_canary_scores.png``.

Left: ``scenarios/tutorial/11_is_my_epsilon_real.yaml`` (DP-SGD, sigma 1; its attack left out, it does not change
the federation); right: ``scenarios/audit/no_noise.yaml`` (sigma 0, every record in every step). Each panel is the
histogram of the included vs the left-out canaries' cosines with the released model's change, titled with the
accountant's epsilon, the one-run lower bound and the Gaussian estimate from the run's ``audit`` block (printed too).

    OMP_NUM_THREADS=1 python benchmarks/audit_figure.py [--figure PATH]
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

from fedsim.report.audit import fmt_num  # noqa: E402
from fedsim.run import run_scenario  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

RUNS = (("step 11: DP-SGD, sigma 1", ROOT / "scenarios" / "tutorial" / "11_is_my_epsilon_real.yaml"),
        ("no noise: sigma 0", ROOT / "scenarios" / "audit" / "no_noise.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "tutorial_11_canary_scores.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, (title, path) in zip(axes, RUNS, strict=True):
        block = run_scenario(load_scenario(path, ["attacks=[]"]), write=False).audit
        eps, lb, est = block["epsilon"], block["epsilon_lower_bound"], block["epsilon_estimate"]
        print(f"{title}: eps Opacus {fmt_num(eps['opacus'])}, RDP {fmt_num(eps['dp_accounting_rdp'])}, PLD "
              f"{fmt_num(eps['dp_accounting_pld'])}; lower bound {fmt_num(lb['value'])} ({lb['correct']}/"
              f"{lb['guesses']}); estimate {fmt_num(est['value'])} [{fmt_num(est['ci'][0])}, "
              f"{fmt_num(est['ci'][1])}]; accuracy {fmt_num(block['utility']['test_accuracy'])}")
        ins, outs = block["scores"]["in"], block["scores"]["out"]
        lo, hi = min(ins + outs), max(ins + outs)
        bins = [lo + (hi - lo) * i / 25 for i in range(26)]
        ax.hist(outs, bins=bins, alpha=0.6, color="tab:blue", label=f"left out ({len(outs)})")
        ax.hist(ins, bins=bins, alpha=0.6, color="tab:red", label=f"included ({len(ins)})")
        ax.set_title(f"{title}\naccountant eps {fmt_num(eps['opacus'], 2)}, lower bound {fmt_num(lb['value'], 2)}, "
                     f"estimate {fmt_num(est['value'], 1)}", fontsize=9)
        ax.set_xlabel("cosine(canary, released model change)", fontsize=8)
        ax.set_ylabel("canaries", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=90)
    plt.close(fig)
    print(f"wrote {args.figure} ({args.figure.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
