"""Public pretraining (fedsim/text/pretrain.py): it helps on held-out private text, it is cached and reused, bert's
classification head is not pretrained, and the public part shares no verse with any client's data."""

from __future__ import annotations

import gzip
import math
import warnings

import pytest
import torch

from fedsim.data import load_dataset
from fedsim.data.sources import client_examples, examples_of
from fedsim.scenario import DataSpec, parse_scenario
from fedsim.simulation.setup import setup_for
from fedsim.text import pretrain

T = 8


def _scenario(name: str = "gpt", steps: int = 60, dataset: str = "kjv"):  # noqa: ANN202
    return parse_scenario({"name": "pre", "seed": 3, "data": {"dataset": dataset, "seq_len": T},
                           "model": {"name": name, "width": 32, "depth": 1,
                                     "pretrain": {"steps": steps, "batch_size": 32, "lr": 3e-3}},
                           "federation": {"clients": 4, "rounds": 1}})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pretrain, "_LOADED", {})


def _perplexity(model: torch.nn.Module, x: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy, by hand: -log softmax at the next token, averaged."""
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(x)[:, :-1], dim=-1)
        nll = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).mean()
    return math.exp(float(nll))


def test_pretrained_gpt_predicts_held_out_private_verses_better_than_its_random_init() -> None:
    scenario = _scenario()
    setup = setup_for(scenario)
    pretrained = setup.build_model()
    scratch = setup_for(scenario.model_copy(update={"model": scenario.model.model_copy(update={"pretrain": None})}))
    random_init = scratch.build_model()
    test_x = setup.data.test_x  # New Testament verses no client trains on (and never in the public part)
    ppl_pre, ppl_rand = _perplexity(pretrained, test_x), _perplexity(random_init, test_x)
    assert ppl_pre < 0.5 * ppl_rand, (ppl_pre, ppl_rand)
    record = pretrain.pretrain_record(scenario, pretrained)
    assert record["steps"] == 60 and record["public_heldout_perplexity"] < ppl_rand


def test_cache_is_reused_and_a_foreign_file_is_left_alone(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    scenario = _scenario(steps=5)
    model = setup_for(scenario).build_model()
    files = list((tmp_path / "pretrained").glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(pretrain, "_LOADED", {})

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(pretrain, "_train", no_training)
    again = setup_for(scenario).build_model()
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # a file fedsim did not write, at the key's name: never replaced (training goes on, uncached)
    monkeypatch.undo()
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pretrain, "_LOADED", {})
    files[0].write_bytes(b"not fedsim's")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_for(scenario).build_model()
    assert files[0].read_bytes() == b"not fedsim's"
    assert any("not a fedsim cache file" in str(w.message) for w in caught)


def test_a_changed_public_part_is_never_served_the_cached_model(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The cache key covers the public rows themselves: after a change of the data rule (e.g. the issue-16
    de-duplication dropped public rows equal to private ones) the old model is not reused."""
    import fedsim.data.text as text

    scenario = _scenario(steps=5)
    setup_for(scenario).build_model()
    assert len(list((tmp_path / "pretrained").glob("*.pt"))) == 1
    original = text.public_sequences
    monkeypatch.setattr(text, "public_sequences", lambda spec, seq_len: original(spec, seq_len)[:-1])
    monkeypatch.setattr(pretrain, "_LOADED", {})
    setup_for(scenario).build_model()
    assert len(list((tmp_path / "pretrained").glob("*.pt"))) == 2  # trained (and cached) anew


def test_bert_pretrains_its_encoder_and_keeps_its_seeded_head() -> None:
    scenario = _scenario("bert", steps=5, dataset="kjv-genre")
    pretrained = setup_for(scenario).build_model()
    plain = setup_for(scenario.model_copy(update={"model": scenario.model.model_copy(update={"pretrain": None})}))
    seeded = plain.build_model()
    assert torch.equal(pretrained.head.weight, seeded.head.weight)
    assert not torch.equal(pretrained.embed.tok.weight, seeded.embed.tok.weight)
    assert not any(k.startswith("mlm") for k in pretrained.state_dict())


def test_public_part_shares_no_verse_with_the_clients() -> None:
    """By verse position (fedsim.data.sources) and by the verses' full texts read from the corpus file."""
    from fedsim.data.text import ASSETS, CORPUS_FILE, public_examples

    spec = DataSpec(dataset="kjv", seq_len=T)
    public = public_examples(spec, T)
    clients = client_examples(spec)
    test = examples_of("kjv", "test", 0, None, spec=spec)
    with gzip.open(ASSETS / CORPUS_FILE, "rt", encoding="utf-8") as fh:
        verses = [line.rstrip("\n").split("\t")[3] for line in fh]

    def rows(examples) -> set[int]:  # noqa: ANN001
        idx = examples.indices
        return set(range(*idx) if isinstance(idx, tuple) else (int(i) for i in idx))

    public_rows = rows(public)
    assert len(public_rows) == len(pretrain_public(spec))
    for private in (clients, test):
        private_rows = rows(private)
        assert public_rows.isdisjoint(private_rows)
        assert {verses[i] for i in public_rows}.isdisjoint({verses[i] for i in private_rows})
    assert len(rows(clients)) == load_dataset(spec).num_train


def pretrain_public(spec: DataSpec) -> torch.Tensor:
    from fedsim.data.text import public_sequences

    return public_sequences(spec, T)


@pytest.mark.ray
@pytest.mark.slow  # 30 s; backend equality stays in the default suite via test_ray_backend and the secagg pipeline
def test_pretrained_dp_run_gives_the_same_numbers_on_both_backends() -> None:
    """A pretrained gpt fine-tuned with DP-SGD (ghost clipping): in-process and Ray runs agree exactly."""
    from fedsim.run import run_scenario

    raw = {"name": "p", "seed": 0, "data": {"dataset": "kjv", "seq_len": T, "train_subset": 200},
           "model": {"name": "gpt", "width": 32, "depth": 1, "pretrain": {"steps": 20, "batch_size": 16}},
           "federation": {"clients": 2, "rounds": 2, "local": {"batch_size": 16}},
           "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "grad_sample_mode": "ghost"}}]}
    losses = {}
    for backend in ("inprocess", "ray"):
        result = run_scenario(parse_scenario(raw), write=False, backend=backend)
        assert not result.client_failures, result.client_failures
        losses[backend] = [h["test_loss"] for h in result.history if "test_loss" in h]
    assert losses["inprocess"] == losses["ray"]
