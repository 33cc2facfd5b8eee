"""Simulation overhead: a fedsim FedAvg run against a bare PyTorch loop doing the same client work.

Prints, from one run, wall times and the ratios fedsim/bare for the in-process backend and for the
Ray backend (Ray start-up, i.e. ray.init plus actor start and the partition discovery round, is
reported apart and excluded from the ratio). Targets: <= 1.05 (inprocess), <= 1.2 (ray, after
start-up). The bare loop trains the same model on the same partitions with the same batch sizes and
evaluates the global model after every round, as fedsim does.

    python benchmarks/sim_overhead.py [--rounds 3] [--clients 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fedsim.data import normalize
from fedsim.scenario import parse_scenario
from fedsim.seeding import derive_seed
from fedsim.simulation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.training import evaluate


def scenario(rounds: int, clients: int):
    return parse_scenario({
        "name": "sim-overhead", "seed": 0, "device": "cpu",
        "data": {"dataset": "mnist-5k", "partition": {"kind": "iid"}},
        "model": {"name": "convnet", "width": 16},
        "federation": {"clients": clients, "rounds": rounds, "protocol": "fedavg",
                       "local": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "backend": {"kind": "inprocess", "client_resources": {"num_cpus": 1}},
    })


def bare_loop(sc) -> float:
    """Plain PyTorch FedAvg: same data, model, batches per epoch and evaluation; no Flower, no fedsim loop."""
    setup = setup_for(sc)
    data, fed = setup.data, sc.federation
    model = setup.build_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    for rnd in range(1, fed.rounds + 1):
        states, weights = [], []
        for pid in range(fed.clients):
            x, y = setup.client_data(pid)
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=fed.local.lr)
            gen = torch.Generator().manual_seed(derive_seed(sc.seed, "bare", rnd, pid))
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), fed.local.batch_size):
                idx = order[s : s + fed.local.batch_size]
                opt.zero_grad()
                F.cross_entropy(model(normalize(x[idx], data.mean, data.std)), y[idx]).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(x))
        total = sum(weights)
        global_state = {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True)).to(v.dtype)
                        for k, v in global_state.items()}
        model.load_state_dict(global_state)
        evaluate(model, data.test_x, data.test_y, mean=data.mean, std=data.std, batch_size=256,
                 device=torch.device("cpu"))
    return time.perf_counter() - start


def fedsim_run(sc, backend: str) -> tuple[float, float]:
    """(start-up seconds, seconds for the rounds) of a fedsim run on ``backend``."""
    start = time.perf_counter()
    outcome = run_federation(sc, backend=backend)
    total = time.perf_counter() - start
    rounds_s = outcome.history[-1]["seconds"] - outcome.history[0]["seconds"]
    return total - rounds_s, rounds_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sc = scenario(args.rounds, args.clients)
    setup_for(sc).data  # noqa: B018 - load data outside every timer
    bare_loop(sc)  # warm-up (allocator, kernels)
    bare_times, inproc_times = [], []
    for _ in range(args.repeats):  # alternate, keep the best of each: robust to a busy machine
        bare_times.append(bare_loop(sc))
        inproc_times.append(fedsim_run(sc, "inprocess")[1])
    bare, inproc = min(bare_times), min(inproc_times)
    ray_start, ray_rounds = fedsim_run(sc, "ray")
    print(f"workload: {args.clients} clients x {args.rounds} FedAvg rounds, mnist-5k, convnet(16), 1 local epoch")
    print(f"bare PyTorch loop      : {bare:7.2f} s   (best of {args.repeats})")
    ratio = inproc / bare
    print(f"fedsim inprocess       : {inproc:7.2f} s   ratio {ratio:5.2f}  (target <= 1.05; best of {args.repeats})")
    print(f"fedsim ray (rounds)    : {ray_rounds:7.2f} s   ratio {ray_rounds / bare:5.2f}  (target <= 1.2)")
    print(f"fedsim ray start-up    : {ray_start:7.2f} s   (ray.init, actors, partition discovery; not in ratio)")
    print(f"torch threads in this process: {torch.get_num_threads()}; Ray actors: 1 CPU each")


if __name__ == "__main__":
    main()
