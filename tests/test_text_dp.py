"""DP-SGD (defenses/dp_sgd.py) on the text models, through a whole in-process federation: every Opacus
grad-sample mode (hooks, functorch, ew, ghost) in fedsgd and fedavg, on a tiny token dataset registered here.

The modes compute the same clipped per-example gradients by different routes (explicit per-sample gradients,
vmap, expanded weights, ghost norms + a second backward) and draw the same seeded noise, so the runs must agree
number for number: each is the others' independent check. The epsilon is the accountant's closed form for the
steps taken (compared with a fresh Opacus RDP accountant).
"""

from __future__ import annotations

import pytest
import torch

from fedsim.data.bundle import DatasetBundle
from fedsim.data.catalog import DATASETS, DatasetFacts, declare_facts
from fedsim.data.sources import NativeSplits, declare_source
from fedsim.run import run_scenario
from fedsim.scenario import parse_scenario

V, T, N = 30, 8, 64
NAME = "tiny-text-dp-test"
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook")]


def _tiny(spec: object, task: str = "language_modeling") -> DatasetBundle:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randint(0, V, (N, T), generator=gen), torch.randint(0, V, (16, T), generator=gen)
    groups = torch.arange(N) % 4
    if task == "classification":
        return DatasetBundle(NAME + "-cls", train, groups.clone(), test, torch.arange(16) % 4, 4, (), (), "random",
                             task="classification", vocab_size=V, tokenizer="none", groups=groups,
                             source_names=("a", "b", "c", "d"))
    return DatasetBundle(NAME, train, train.clone(), test, test.clone(), V, (), (), "random", task="language_modeling",
                         vocab_size=V, tokenizer="none", groups=groups, source_names=("a", "b", "c", "d"))


for _name, _task in ((NAME, "language_modeling"), (NAME + "-cls", "classification")):
    if _name not in DATASETS:
        DATASETS.add(_name, lambda spec, _task=_task: _tiny(spec, _task))
    declare_facts(_name, DatasetFacts(task=_task, inputs="tokens", seq_len=T))
    declare_source(_name, NativeSplits("tiny-text-dp-random"))  # every registered dataset declares its source


def _run(model: str, protocol: str, mode: str):  # noqa: ANN202
    raw = {"name": "text-dp", "seed": 0, "device": "cpu",
           "data": {"dataset": NAME if model == "gpt" else NAME + "-cls"},
           "model": {"name": model, "width": 32, "depth": 1},
           "federation": {"clients": 2, "rounds": 2, "protocol": protocol,
                          "local": {"batch_size": 8, "lr": 0.1, "steps": 2}},
           "backend": {"kind": "inprocess"},
           "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 0.5,
                                                      "grad_sample_mode": mode}}]}
    return run_scenario(parse_scenario(raw), write=False)


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_every_grad_sample_mode_trains_a_text_model_and_they_agree(model: str, protocol: str) -> None:
    from opacus.accountants import RDPAccountant

    results = {mode: _run(model, protocol, mode) for mode in ("hooks", "functorch", "ew", "ghost")}
    steps = 1 if protocol == "fedsgd" else 2
    accountant = RDPAccountant()
    accountant.history = [(1.0, 8 / 32, 2 * steps)]  # 2 rounds, 32 examples a client, expected batch 8
    want_eps = accountant.get_epsilon(1e-5)
    ref = results["hooks"].history[-1]
    for mode, result in results.items():
        assert not result.client_failures, (mode, result.client_failures)
        last = result.history[-1]
        assert last["clients_aggregated"] == 2, mode
        assert abs(last["test_loss"] - ref["test_loss"]) < 1e-4, (mode, last["test_loss"], ref["test_loss"])
        for client in (0, 1):
            assert abs(result.client_metrics[2][client]["epsilon"] - want_eps) < 1e-6, mode


def test_language_model_partitions_cover_each_sequence_once() -> None:
    """LM labels are (N, T) token ids: the partition is over the N sequences, not the N*T tokens."""
    from fedsim.simulation.setup import setup_for

    raw = {"name": "p", "seed": 0, "data": {"dataset": NAME}, "model": {"name": "gpt", "width": 32, "depth": 1},
           "federation": {"clients": 3, "rounds": 1}}
    parts = setup_for(parse_scenario(raw)).partitions
    assert sorted(int(i) for p in parts for i in p) == list(range(N))


def test_language_model_runs_report_perplexity(tmp_path) -> None:  # noqa: ANN001
    """metrics.json, summary.md and the CLI's numbers: test perplexity = exp(test loss) beside next-token accuracy."""
    import json
    import math

    raw = {"name": "text-lm", "seed": 0, "data": {"dataset": NAME}, "model": {"name": "gpt", "width": 32, "depth": 1},
           "federation": {"clients": 2, "rounds": 1, "local": {"batch_size": 8}}, "backend": {"kind": "inprocess"}}
    run_scenario(parse_scenario(raw), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["utility"]
    evaluated = [r for r in rows if "test_loss" in r]
    assert evaluated and all(math.isclose(r["test_perplexity"], math.exp(r["test_loss"]), rel_tol=1e-9)
                             for r in evaluated)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in evaluated)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"{evaluated[-1]['test_perplexity']:.4g}" in summary and "next-token accuracy" in summary
