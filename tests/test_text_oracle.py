"""Ground truth never reaches a text attack unlabelled (issue 16 review, findings 1, 9 and 11).

* A language model's labels ARE its input text: ``knowledge.labels: known`` on a language-modeling task is refused at
  ``attacks[i].knowledge.labels`` (one line, exit 2), and, should a grant carrying the inputs reach a view anyway
  (validation bypassed here; a future task kind), the runner labels the outcome oracle
  (:func:`fedsim.attacking.input_grants`), checked by a scan of every granted view written here.
* The attack-test fixture (tests/text_updates.py) grants nothing, and no text attack's output depends on
  ``side_info["labels"]``: deliberately wrong labels give the same output as none.
* A text attack returns at most ``examples_to_reconstruct`` sequences: more would make the scorer choose among them
  with the ground truth (an oracle). DAGER's encoder and decoder searches keep the best by their own residual.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import yaml
from text_support import tiny_text
from text_updates import text_update
from typer.testing import CliRunner

from fedsim.attacking import input_grants, judge, observe, oracle_grants
from fedsim.attacks.dager import Dager
from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.metrics import score_reconstruction
from fedsim.plugins import attack_registry
from fedsim.scenario import AttackSpec, Budget, Knowledge, parse_scenario
from fedsim.simulation.capture import CapturedUpdate
from fedsim.threat import GroundTruth

TEXT_ATTACKS = sorted(n for n in attack_registry() if "tokens" in attack_registry().get(n).inputs)
VOCAB, SEQ, WIDTH = 256, 8, 64


def lm_labels_known(attack: str = "token_set") -> dict:
    return tiny_text("gpt", attacks=[{"name": "token_set"}, {"name": attack, "knowledge": {"labels": "known"}}])


# --- kind 1: a grant that is the client's inputs ------------------------------------------------------------------

def test_lm_label_grant_is_refused_at_its_field(tmp_path) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(lm_labels_known())
    assert err.value.path == "attacks[1].knowledge.labels" and "input" in err.value.reason, err.value
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(lm_labels_known("dager")))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1 and "attacks[1].knowledge.labels" in out.output, out.output


def test_classification_label_grant_is_still_accepted() -> None:
    raw = tiny_text("bert", attacks=[{"name": "tag", "knowledge": {"labels": "known"}}])
    assert parse_scenario(raw).attacks[0].knowledge.labels == "known"


def test_a_grant_holding_the_inputs_makes_the_run_an_oracle(tmp_path, monkeypatch) -> None:
    """Validation bypassed (as a future task kind whose labels derive from its inputs would slip past it): the run
    still labels the outcome oracle, with the grant named, in the outcome and in metrics.json."""
    import json

    import fedsim.task_checks
    from fedsim.run import run_scenario

    monkeypatch.setattr(fedsim.task_checks, "_check_text", lambda scenario, task: None)
    result = run_scenario(parse_scenario(lm_labels_known()), out_dir=tmp_path / "run")
    honest, granted = result.outcomes
    assert not honest.oracle and honest.failed is None
    assert granted.oracle and any("side_info['labels'] holds the client's inputs" in r
                                  for r in granted.oracle_reasons), granted.oracle_reasons
    filed = json.loads((result.out_dir / "metrics.json").read_text())["attacks"]
    assert [a["oracle"] for a in filed] == [False, True]


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (mappings and sequences searched)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


FLAGS = [Knowledge(), Knowledge(labels="known"), Knowledge(local_hparams=True), Knowledge(defense=True),
         Knowledge(bn_stats="running"), Knowledge(oracle_masks=True), Knowledge(auxiliary_data=True),
         Knowledge(labels="known", local_hparams=True, defense=True, oracle_masks=True)]


@pytest.mark.parametrize("model", ["gpt", "bert"])
@pytest.mark.parametrize("knowledge", FLAGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k if b not in
                                                                     (False, "none", "infer")) or "default")
def test_every_granted_view_holding_the_inputs_is_judged_oracle(model: str, knowledge: Knowledge) -> None:
    """Each text task kind x knowledge flag: the view ``observe`` builds either holds no tensor equal to the inputs
    (or to their one-token shifts, an LM's targets) in its grants, or the runner's grants make the outcome an oracle.
    The scan here is independent of :func:`input_grants` (``torch.equal`` on every granted tensor)."""
    scenario = parse_scenario(tiny_text("bert", defenses=[{"name": "clipping"}]))  # federation, defenses: any
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    y = x.clone() if model == "gpt" else x[:, 0] % 3
    upd = text_update(model, [x], VOCAB, width=WIDTH)
    truth = GroundTruth(1, 0, x, y, {"mask/blocks.0": torch.ones(3)})
    cap = CapturedUpdate(1, 0, dict(upd.global_state), dict(upd.update), 2, truth)
    view = observe(cap, upd.task, scenario, AttackSpec(name="tag", knowledge=knowledge), [{"name": "clipping"}])
    granted = _tensors(dict(view.side_info)) + _tensors(dict(view.hyperparams)) + _tensors(list(view.defenses))
    carries = any(t.shape == s.shape and torch.equal(t.long(), s) for t in granted for s in (x, x[:, 1:], x[:, :-1]))
    oracle, reasons, _, _ = judge({}, (*oracle_grants(knowledge), *input_grants(view, x)))
    assert oracle or not carries, (knowledge, reasons)
    if model == "gpt" and knowledge.labels == "known":
        assert carries and any("labels" in r for r in reasons)  # the case validation refuses
    if model == "bert" and not knowledge.oracle_masks:
        assert not oracle  # no false alarm: bert's class labels are not its inputs


def test_input_grants_finds_nested_and_shifted_copies() -> None:
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    upd = text_update("gpt", [x], VOCAB, width=WIDTH)
    assert input_grants(upd, x) == ()
    nested = dataclasses.replace(upd, side_info={"aux": {"targets": x[:, 1:].clone()}, "n": 3})
    assert input_grants(nested, x) == ("side_info['aux']['targets'] holds the client's inputs",)
    images = torch.rand(2, 3, 4, 4)
    as_float = dataclasses.replace(upd, side_info={"seen": images.clone().reshape(2, -1)})
    assert input_grants(as_float, images) and not input_grants(as_float, torch.rand(2, 3, 4, 4))


# --- kind 2: test views grant nothing, and no text attack reads side_info["labels"] ---------------------------------

@pytest.mark.parametrize("model", ["gpt", "bert"])
@pytest.mark.parametrize("kw", [{}, {"protocol": "fedavg"}, {"dp": (1.0, 1.0)}])
def test_fixture_views_grant_nothing(model: str, kw: dict) -> None:
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    upd = text_update(model, [x], VOCAB, width=WIDTH, **kw)
    assert dict(upd.side_info) == {} and dict(upd.hyperparams) == {} and upd.defenses == ()
    assert input_grants(upd, x) == ()
    with pytest.raises(ValueError):
        text_update("gpt", [x], VOCAB, width=WIDTH, grant_labels=True)


def _ids(t: torch.Tensor | None) -> list | None:
    return None if t is None else t.tolist()


def _output(rec) -> tuple:  # noqa: ANN001
    return rec.failed, _ids(rec.tokens), _ids(rec.token_set), _ids(rec.labels)


@pytest.mark.parametrize("name", TEXT_ATTACKS)
def test_no_text_attack_reads_the_labels_side_info_on_lm(name: str) -> None:
    """Same seed, same update: no labels, and deliberately wrong (B, T) labels, give the identical output."""
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    upd = text_update("gpt", [x], VOCAB, width=WIDTH)
    wrong = dataclasses.replace(upd, side_info={"labels": (x + 1 + torch.arange(SEQ)) % VOCAB})
    cls = attack_registry().get(name)
    outs = []
    for view in (upd, wrong):
        attack = cls(cls.Params(), Knowledge(), Budget(iterations=3), torch.device("cpu"), 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(_output(attack.reconstruct(view)))
    assert outs[0] == outs[1], name
    assert outs[0][0] is None, outs[0][0]  # it ran (a failed attack would pass vacuously)


# --- kind 3: at most examples_to_reconstruct sequences ------------------------------------------------------------

def dager(**params) -> Dager:
    return Dager(Dager.Params(**params), Knowledge(), Budget(iterations=0), torch.device("cpu"), 0)


@pytest.mark.parametrize("model", ["bert", "gpt"])
def test_dager_returns_at_most_the_batch_when_more_pass(model: str) -> None:
    """A loose tolerance (and one encoder sweep) lets false sequences pass: the encoder accepted 4 for a batch of
    2 (measured), the decoder 2048. The attack keeps 2, by its own layer-2 residual, so a true sequence (residual
    ~1e-7) survives and the runner does not label the honest attack an oracle for surplus."""
    vocab = 30 if model == "bert" else 2048
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    upd = text_update(model, [x], vocab, width=128)
    attack = dager(span_tol=0.95, encoder_restarts=2, encoder_sweeps=1) if model == "bert" else dager(span_tol=0.3)
    rec = attack.reconstruct(upd)
    assert rec.failed is None
    assert rec.tokens.shape == (upd.examples_to_reconstruct, 12) == (2, 12)
    assert rec.stats["surplus_dropped"] > 0  # more than the batch passed the tolerance
    kept = {tuple(r) for r in rec.tokens.tolist()}
    assert {tuple(r) for r in x.tolist()} & kept  # the best-residual rows include a true sequence
    metrics = score_reconstruction(rec, GroundTruth(1, 0, x, x if model == "gpt" else x[:, 0] % 3))
    oracle, reasons, _, _ = judge(metrics, (), asked=upd.examples_to_reconstruct)
    assert not oracle, reasons


@pytest.mark.parametrize("name", TEXT_ATTACKS)
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_every_text_attack_returns_at_most_the_declared_count(name: str, model: str) -> None:
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    upd = text_update(model, [x], VOCAB, width=WIDTH)
    cls = attack_registry().get(name)
    rec = cls(cls.Params(), Knowledge(), Budget(iterations=3), torch.device("cpu"), 0).reconstruct(upd)
    assert rec.failed is None, rec.failed
    assert rec.tokens is None or len(rec.tokens) <= upd.examples_to_reconstruct
