"""fedsim against apple's pfl-research (``pfl`` on PyPI): time per federated round, same work on both.

Workload (issue 17, item 6): mnist-5k (bundled), ConvNet width 8, 100 IID clients, 10 sampled per round,
20 FedAvg rounds, 1 local epoch of SGD at batch 16. Both simulators get the same partitions (fedsim's IID
split), the same clients each round (fedsim's seeded sample, fed to pfl as its user sampler) and the same
initial weights (fedsim's model, loaded into the module pfl trains). Both evaluate the global model on the
test set once, after the last round. Central DP: client-level, fixed clipping C = 1, sigma = 1, delta = 1e-5
(fedsim: ``central_dp``, server side; pfl: ``GaussianMechanism`` from an RDP ``PrivacyAccountant``, applied
centrally). A bare PyTorch loop doing the same client work (load global weights, train, average) is the floor.

Per-round time: rounds 2..R (round 1 holds one-off costs on every simulator: pfl's local evaluation at
iteration 0, first calls), divided by R - 1. Runs are interleaved and the fastest of ``--repeats`` is kept
for each (robust to a busy, shared CPU). Targets: fedsim/pfl <= 1.1 without DP, <= 1.2 with central DP
(in-process backend). pfl is optional: install it into a separate virtual environment that sees fedsim,

    python -m venv --system-site-packages /work/venv-pfl && /work/venv-pfl/bin/pip install pfl
    /work/venv-pfl/bin/python benchmarks/vs_pfl.py [--repeats 9] [--rounds 20] [--ray]

Without pfl the script prints one line and exits 0.

Measured (shared 2-core CPU, 1 thread, timings +-10 % between runs): before issue 17's changes fedsim/pfl 1.31 without
DP and 1.40 with central DP (fastest of 5); after 1.07 and 1.20 (fastest of 9), a bare loop at 0.90-0.96x fedsim.
Two more runs of 9 on the idle machine: 1.15 / 1.05 and 1.09 / 1.24 (no DP / central DP): +-0.1 from run to run.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from collections.abc import Callable

NOT_INSTALLED = "vs_pfl: pfl is not installed (pip install pfl, in a separate venv); nothing compared"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved runs; the fastest of each is kept")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    parser.add_argument("--ray", action="store_true", help="also time fedsim on the Ray backend (fewer repeats)")
    parser.add_argument("--no-dp", action="store_true", help="skip the central-DP comparison")
    return parser


if __name__ == "__main__":  # --help, bad arguments and an absent pfl answer before torch loads (~5 s)
    _parser().parse_args()
    if importlib.util.find_spec("pfl") is None:
        print(NOT_INSTALLED)
        sys.exit(0)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CLIP, SIGMA, DELTA, LR, BATCH, EVAL_BATCH = 1.0, 1.0, 1e-5, 0.05, 16, 256


def scenario(args: argparse.Namespace, dp: bool, backend: str = "inprocess"):  # noqa: ANN201 - fedsim Scenario
    from fedsim.scenario import parse_scenario

    return parse_scenario({
        "name": "vs-pfl", "seed": 0, "device": "cpu",
        "data": {"dataset": "mnist-5k", "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 8},
        "federation": {"clients": args.clients, "clients_per_round": args.per_round, "rounds": args.rounds,
                       "protocol": "fedavg", "local": {"epochs": 1, "batch_size": BATCH, "lr": LR}},
        "evaluation": {"every": args.rounds, "batch_size": EVAL_BATCH},
        "backend": {"kind": backend, "client_resources": {"num_cpus": 1}},
        "defenses": [{"name": "central_dp", "params": {"clipping_norm": CLIP, "noise_multiplier": SIGMA,
                                                       "delta": DELTA}}] if dp else [],
    })


class Workload:
    """What every simulator gets: normalized client data, the sampled clients per round, initial weights."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fedsim.data import normalize
        from fedsim.simulation.setup import setup_for
        from fedsim.simulation.staleness import round_partitions

        sc = scenario(args, dp=False)
        setup = setup_for(sc)
        data = setup.data
        self.rounds = args.rounds
        self.clients = [(normalize(x, data.mean, data.std), y)
                        for x, y in (setup.client_data(p) for p in range(args.clients))]
        self.test = (normalize(data.test_x, data.mean, data.std), data.test_y)
        self.sampled = [round_partitions(sc, r) for r in range(1, args.rounds + 1)]
        self.build = setup.build_model  # the initial global model (fresh module, fedsim's seeded weights)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in batches of EVAL_BATCH (the same work fedsim's evaluation does)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), EVAL_BATCH):
            correct += int((model(x[s:s + EVAL_BATCH]).argmax(1) == y[s:s + EVAL_BATCH]).sum())
    return correct / len(x)


def bare(w: Workload, dp: bool) -> float:
    """Per-round seconds of a plain PyTorch FedAvg loop (the floor): no messages, no framework."""
    model = w.build()
    current = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    marks = []
    for rnd, pids in enumerate(w.sampled, start=1):
        deltas = []
        for pid in pids:
            x, y = w.clients[pid]
            model.load_state_dict(current)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), BATCH):
                idx = order[s:s + BATCH]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            delta = {k: v.detach() - current[k] for k, v in model.state_dict().items()}
            if dp:  # clip the whole update to norm C
                norm = torch.sqrt(sum((d.float() ** 2).sum() for d in delta.values()))
                delta = {k: d * min(1.0, CLIP / (float(norm) + 1e-12)) for k, d in delta.items()}
            deltas.append(delta)
        mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in current}
        if dp:
            mean = {k: v + torch.randn(v.shape, generator=gen) * SIGMA * CLIP / len(deltas) for k, v in mean.items()}
        current = {k: current[k] + mean[k] for k in current}
        if rnd == w.rounds:
            model.load_state_dict(current)
            evaluate(model, *w.test)
        marks.append(time.perf_counter())
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def fedsim_round(args: argparse.Namespace, dp: bool, backend: str = "inprocess") -> float:
    """Per-round seconds of ``fedsim``'s federation (rounds 2..R, from its history's clock)."""
    from fedsim.simulation import run_federation

    out = run_federation(scenario(args, dp, backend), backend=backend)
    rows = [r for r in out.history if r["round"] >= 1]
    return (rows[-1]["seconds"] - rows[0]["seconds"]) / (len(rows) - 1)


def pfl_round(w: Workload, dp: bool) -> float:
    """Per-round seconds of pfl's simulation of the same federation (rounds 2..R)."""
    import numpy as np
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism, RDPPrivacyAccountant

    class Net(nn.Module):
        """fedsim's ConvNet with the ``loss`` and ``metrics`` pfl's PyTorchModel asks for."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
            self.train(not eval)
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:  # noqa: A002
            from pfl.metrics import Weighted

            self.eval()
            return {"loss": Weighted(float(F.cross_entropy(self(x), y, reduction="sum")), len(y))}

    class Clock(TrainingProcessCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # noqa: ANN001, ANN201
            if central_iteration == w.rounds - 1:
                evaluate(net, *w.test)
            self.marks.append(time.perf_counter())
            return False, Metrics()

    np.random.seed(0)
    torch.manual_seed(0)
    net = Net(w.build())
    order = iter([pid for pids in w.sampled for pid in pids])
    users = FederatedDataset(lambda pid: Dataset(raw_data=list(w.clients[pid]), user_id=pid), lambda: next(order))
    postprocessors = []
    if dp:
        accountant = RDPPrivacyAccountant(num_compositions=w.rounds, sampling_probability=len(w.sampled[0])
                                          / len(w.clients), mechanism="gaussian", noise_parameter=SIGMA, delta=DELTA)
        postprocessors = [CentrallyAppliedPrivacyMechanism(GaussianMechanism.from_privacy_accountant(accountant, CLIP))]
    backend = SimulatedBackend(training_data=users, val_data=None, postprocessors=postprocessors)
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    clock = Clock()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=w.rounds, evaluation_frequency=10**9,
                                           train_cohort_size=len(w.sampled[0]), val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=1, local_batch_size=BATCH),
        model_eval_params=NNEvalHyperParams(local_batch_size=EVAL_BATCH), callbacks=[clock],
        send_metrics_to_platform=False,
    )
    return (clock.marks[-1] - clock.marks[0]) / (len(clock.marks) - 1)


def best(fn: Callable[[], float], into: list[float]) -> None:
    into.append(fn())


def main() -> int:
    args = _parser().parse_args()
    if importlib.util.find_spec("pfl") is None:
        print(NOT_INSTALLED)
        return 0
    torch.set_num_threads(args.threads)
    logging.getLogger("absl").setLevel(logging.ERROR)  # pfl's RDP accountant logs each order it cannot sum
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)  # pfl's noise
    w = Workload(args)
    arms: dict[str, Callable[[], float]] = {
        "bare": lambda: bare(w, False), "fedsim": lambda: fedsim_round(args, False), "pfl": lambda: pfl_round(w, False),
    }
    if not args.no_dp:
        arms.update({"bare+dp": lambda: bare(w, True), "fedsim+dp": lambda: fedsim_round(args, True),
                     "pfl+dp": lambda: pfl_round(w, True)})
    for fn in arms.values():  # warm-up: imports, allocator, first kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            best(fn, times[name])
    if args.ray:
        times["fedsim-ray"] = [fedsim_round(args, False, "ray") for _ in range(max(1, args.repeats // 3))]
        if not args.no_dp:
            times["fedsim-ray+dp"] = [fedsim_round(args, True, "ray") for _ in range(max(1, args.repeats // 3))]
    t = {k: min(v) for k, v in times.items()}
    print(f"workload: mnist-5k, convnet(8), {args.clients} IID clients, {args.per_round}/round, {args.rounds} rounds, "
          f"1 epoch, batch {BATCH}; per round over rounds 2..{args.rounds}, fastest of {args.repeats}, "
          f"{torch.get_num_threads()} torch thread(s)")
    for dp in ("", "+dp"):
        if f"fedsim{dp}" not in t:
            continue
        label = "central DP" if dp else "no DP"
        print(f"[{label}] bare {t['bare' + dp] * 1e3:6.1f} ms   pfl {t['pfl' + dp] * 1e3:6.1f} ms   "
              f"fedsim {t['fedsim' + dp] * 1e3:6.1f} ms   fedsim/pfl {t['fedsim' + dp] / t['pfl' + dp]:5.2f}  "
              f"(target <= {1.2 if dp else 1.1})   pfl/bare {t['pfl' + dp] / t['bare' + dp]:5.2f}   "
              f"fedsim/bare {t['fedsim' + dp] / t['bare' + dp]:5.2f}")
        if f"fedsim-ray{dp}" in t:
            print(f"[{label}] fedsim ray {t['fedsim-ray' + dp] * 1e3:6.1f} ms   "
                  f"fedsim-ray/pfl {t['fedsim-ray' + dp] / t['pfl' + dp]:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
