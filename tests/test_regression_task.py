"""The regression task (DIFF2's setting, spec algorithms-more.md §9.7): tabular data, FC_10, MSE.

Kinds guarded here, each against an independent computation (numpy/scikit-learn/closed form), never the
call under test:

* data: diabetes preprocessed as the authors do (y / max|y| over all rows, train_test_split(random_state=0),
  standardization fit on the train part); california-housing loads from scikit-learn's file in data.root and,
  when absent, fails with one line and no network, no folder created;
* per-feature normalization of (N, d) vectors (the per-channel rule broadcast them to (d, N, d));
* fc10: shapes, the authors' U(+-1/sqrt(fan_in)) law (KS test), the forward pass of the formula;
* MSE as the task loss: training, evaluation (test MSE, no accuracy key anywhere), per-example values for
  DP-SGD's ghost clipping (ghost and hooks send the same update);
* a federation trains below the predict-the-mean baseline, reproducibly (inprocess; Ray in a marked test);
* validation refusals at their field paths, also without the data on disk;
* every output (metrics.json, summary.md, report.html, the bench summary and leaderboard) renders a run that
  has no test_accuracy; SecAgg+ too (it read the key unconditionally).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

from fedsim.data import facts_of, load_dataset, normalize
from fedsim.errors import DataUnavailableError, ScenarioError
from fedsim.models import build_model
from fedsim.run import run_scenario
from fedsim.scenario import DataSpec, ModelSpec, parse_scenario, set_dotted
from fedsim.simulation.federation import run_federation
from fedsim.simulation.setup import setup_for
from fedsim.training import mse_loss

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the")]

REG: dict[str, Any] = {
    "name": "reg", "seed": 3, "device": "cpu",
    "data": {"dataset": "diabetes"},
    "model": {"name": "fc10"},
    "federation": {"clients": 10, "rounds": 25, "protocol": "fedsgd", "local": {"batch_size": 1000, "lr": 0.2}},
    "backend": {"kind": "inprocess"},
}


def reg(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(REG)
    for key, value in changes.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return raw


def reference_diabetes(test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """The authors' recipe written out with numpy (population std, as StandardScaler)."""
    x, y = load_diabetes(return_X_y=True, scaled=False)
    y = y / np.abs(y).max()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=0)
    mu, sd = xtr.mean(0), xtr.std(0)
    return (xtr - mu) / sd, (xte - mu) / sd, ytr, yte


# -- data ------------------------------------------------------------------------------------------------------
def test_diabetes_is_the_authors_split_and_scaling() -> None:
    b = load_dataset(DataSpec(dataset="diabetes"))
    xtr, xte, ytr, yte = reference_diabetes()
    assert (b.num_train, len(b.test_x)) == (353, 89) == (len(xtr), len(xte))
    assert b.task == "regression" and b.num_classes == 0 and b.output_dim == 1 and b.input_shape == (10,)
    assert b.train_x.dtype == b.train_y.dtype == torch.float32 and b.train_y.shape == (353,)
    np.testing.assert_allclose(b.train_x.numpy(), xtr, atol=1e-5)
    np.testing.assert_allclose(b.test_x.numpy(), xte, atol=1e-5)
    np.testing.assert_allclose(b.train_y.numpy(), ytr, rtol=1e-6)
    np.testing.assert_allclose(b.test_y.numpy(), yte, rtol=1e-6)
    np.testing.assert_allclose(b.train_x.numpy().mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(b.train_x.numpy().std(0), 1, atol=1e-5)
    assert np.abs(b.test_x.numpy().mean(0)).max() > 0.05  # the scaler saw the train part only
    # y / max|y| over ALL rows (the authors' code scales before splitting): the max sits in one of the parts
    peak = max(float(b.train_y.abs().max()), float(b.test_y.abs().max()))
    assert peak == pytest.approx(1.0, abs=1e-7)
    assert b.mean == (0.0,) * 10 and b.std == (1.0,) * 10
    assert torch.equal(normalize(b.train_x, b.mean, b.std), b.train_x)  # the identity on standardized features


def test_test_fraction_and_train_subset_apply() -> None:
    b = load_dataset(DataSpec(dataset="diabetes", test_fraction=0.5, train_subset=100))
    xtr, xte, _, _ = reference_diabetes(0.5)
    assert (b.num_train, len(b.test_x)) == (100, len(xte)) == (100, 221)
    np.testing.assert_allclose(b.train_x.numpy(), xtr[:100], atol=1e-5)


def test_normalize_is_per_feature_on_vectors() -> None:
    x = torch.arange(12.0).reshape(4, 3)
    mean, std = (1.0, 2.0, 3.0), (1.0, 2.0, 4.0)
    expected = (x.numpy() - np.array(mean)) / np.array(std)
    out = normalize(x, mean, std)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out.numpy(), expected)


def test_california_housing_absent_is_one_line_without_network(tmp_path: Path, monkeypatch) -> None:
    import sklearn.datasets

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("scikit-learn was asked for the data although download is false")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", no_network)
    root = tmp_path / "data"
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(DataSpec(dataset="california-housing", root=str(root)))
    text = str(err.value)
    assert "\n" not in text and "california-housing" in text and str(root) in text
    assert "data.download: true" in text and "cal_housing_py3.pkz" in text
    assert not root.exists()  # nothing created in the user's data folder


def test_california_housing_failed_download_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import urllib.error

    import sklearn.datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", offline)
    with pytest.raises(DataUnavailableError, match=r"downloading it into .* failed \(<urlopen error") as err:
        load_dataset(DataSpec(dataset="california-housing", root=str(tmp_path), download=True))
    assert "\n" not in str(err.value)


def test_california_housing_loads_from_scikit_learns_file(tmp_path: Path) -> None:
    """A small file in scikit-learn's own format (what fetch_california_housing keeps in data_home)."""
    import joblib

    rng = np.random.default_rng(0)
    raw = rng.uniform(1.0, 5.0, size=(40, 9))  # columns: target*1e5, then 8 raw features, as sklearn stores them
    raw[22, 0] = 9.0  # the largest target, in a row train_test_split(random_state=0) puts in the TEST part
    joblib.dump(raw, tmp_path / "cal_housing_py3.pkz", compress=6)
    b = load_dataset(DataSpec(dataset="california-housing", root=str(tmp_path)))
    assert b.input_shape == (8,) == (facts_of("california-housing").features,) and b.task == "regression"
    assert (b.num_train, len(b.test_x)) == (32, 8)
    y = raw[:, 0] / 1e5
    y = y / np.abs(y).max()
    _, _, ytr, _ = train_test_split(np.zeros((40, 1)), y, test_size=0.2, random_state=0)
    np.testing.assert_allclose(b.train_y.numpy(), ytr, rtol=1e-6)
    assert float(b.test_y.max()) == pytest.approx(1.0) and float(b.train_y.max()) < 0.6  # scaled over all rows
    np.testing.assert_allclose(b.train_x.numpy().std(0), 1, atol=1e-5)


# -- model and loss --------------------------------------------------------------------------------------------
def test_fc10_is_the_formula_with_the_authors_init() -> None:
    model = build_model(ModelSpec(name="fc10"), (10,), 1, seed=0)
    (w1, b1), (w2, b2) = [(m.weight.detach(), m.bias.detach()) for m in model.modules()
                          if isinstance(m, torch.nn.Linear)]
    assert w1.shape == (10, 10) and w2.shape == (1, 10) and model.classifier.weight is not None
    x = torch.randn(5, 10)
    expected = np.log1p(np.exp(x.numpy() @ w1.numpy().T + b1.numpy())) @ w2.numpy().T + b2.numpy()
    np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases: pooled over seeds, scaled to U(-1, 1)
    pooled: list[np.ndarray] = []
    for seed in range(20):
        m = build_model(ModelSpec(name="fc10"), (8,), 1, seed=seed)
        for layer in (m.features[1], m.classifier):
            bound = 1 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                assert float(p.detach().abs().max()) <= bound
                pooled.append(p.detach().numpy().ravel() / bound)
    assert stats.kstest(np.concatenate(pooled), stats.uniform(-1, 2).cdf).pvalue > 0.01
    # images are flattened (a normal registry model); image models refuse vectors at model.name
    assert build_model(ModelSpec(name="fc10"), (1, 8, 8), 10, seed=0)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ScenarioError) as err:
        build_model(ModelSpec(name="convnet"), (10,), 1)
    assert err.value.path == "model.name" and "fc10" in err.value.reason


def test_mse_loss_matches_numpy_for_every_reduction() -> None:
    out, y = torch.randn(6, 1), torch.randn(6)
    per = (out.numpy()[:, 0] - y.numpy()) ** 2
    np.testing.assert_allclose(mse_loss(out, y, reduction="none").numpy(), per, rtol=1e-6)
    assert mse_loss(out, y, reduction="none").shape == (6,)  # per example, as ghost clipping needs
    assert float(mse_loss(out, y)) == pytest.approx(per.mean(), rel=1e-6)
    assert float(mse_loss(out, y, reduction="sum")) == pytest.approx(per.sum(), rel=1e-6)
    assert mse_loss(torch.zeros(0, 1), torch.zeros(0), reduction="none").shape == (0,)  # an empty Poisson batch


# -- a federation ----------------------------------------------------------------------------------------------
def _numpy_test_mse(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    w1, b1 = state["features.1.weight"].numpy(), state["features.1.bias"].numpy()
    w2, b2 = state["classifier.weight"].numpy(), state["classifier.bias"].numpy()
    pred = (np.log1p(np.exp(x @ w1.T + b1)) @ w2.T + b2)[:, 0]
    return float(np.mean((pred - y) ** 2))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("reg") / "run"
    return run_scenario(parse_scenario(reg(**{"federation.rounds": 4})), out), out


def test_a_federation_beats_predicting_the_mean() -> None:
    result = run_federation(parse_scenario(reg()))
    _, xte, ytr, yte = reference_diabetes()
    baseline = float(np.mean((yte - ytr.mean()) ** 2))  # the best constant a model could learn from the train part
    evaluated = [h for h in result.history if "test_loss" in h]
    assert len(evaluated) == 26 and not any("test_accuracy" in h for h in result.history)
    final = evaluated[-1]["test_loss"]
    assert final == pytest.approx(_numpy_test_mse(result.final_state, xte, yte), rel=1e-4)  # evaluate = MSE
    assert final < 0.8 * baseline < evaluated[0]["test_loss"]
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"]


def test_same_seed_same_numbers() -> None:
    raw = reg(**{"federation.rounds": 3})
    a, b = (run_federation(parse_scenario(raw)) for _ in range(2))
    keys = ("train_loss", "test_loss")
    assert [[h.get(k) for k in keys] for h in a.history] == [[h.get(k) for k in keys] for h in b.history]
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)


@pytest.mark.ray
@pytest.mark.slow  # ~17 s; backend equality itself is in the default run (tests/test_ray_backend.py)
def test_ray_gives_the_inprocess_numbers() -> None:
    raw = reg(**{"federation.rounds": 2, "federation.clients": 3})
    a = run_federation(parse_scenario(raw))
    b = run_federation(parse_scenario(raw), backend="ray")
    assert [h.get("test_loss") for h in a.history] == [h.get("test_loss") for h in b.history]
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)


def test_dp_sgd_ghost_clipping_sends_what_hooks_send() -> None:
    """Ghost clipping needs the loss per example (reduction 'none', shape (B,)): same update as hooks."""
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 0.5}
    runs = {}
    for mode in ("hooks", "ghost"):
        raw = reg(**{"federation.rounds": 2, "federation.clients": 4, "federation.local.batch_size": 8,
                     "defenses": [{"name": "dp_sgd", "params": {**dp, "grad_sample_mode": mode}}]})
        runs[mode] = run_federation(parse_scenario(raw))
    for k, v in runs["hooks"].final_state.items():
        torch.testing.assert_close(runs["ghost"].final_state[k], v, rtol=1e-5, atol=1e-6)
    assert runs["hooks"].history[-1]["test_loss"] != runs["hooks"].history[0]["test_loss"]


def test_secagg_runs_a_regression(tmp_path: Path) -> None:
    raw = reg(**{"federation.rounds": 2, "federation.clients": 3, "federation.protocol": "fedavg",
                 "defenses": [{"name": "secagg"}]})
    result = run_scenario(parse_scenario(raw), write=False)
    assert [h["round"] for h in result.history if "test_loss" in h] == [0, 1, 2]
    assert not any("test_accuracy" in h for h in result.history)


# -- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "path", "needle"), [
    ({"data.partition": {"kind": "dirichlet"}}, "data.partition.kind", "regression"),
    ({"data.partition": {"kind": "shards"}}, "data.partition.kind", "no classes"),
    ({"attacks": [{"name": "inverting_gradients"}]}, "attacks[0]", "regression"),
    ({"attacks": [{"name": "gmi", "budget": {"iterations": 1},
                   "knowledge": {"local_hparams": True, "auxiliary_data": True}}]}, "attacks[0]", "regression"),
    ({"model": {"name": "convnet"}}, "model.name", "feature vectors"),
    ({"model": {"name": "resnet20"}}, "model.name", "fc10 or mlp"),
    ({"model": {"name": "vit"}}, "model.name", "image"),
    ({"model": {"name": "lenet"}}, "model.name", "image"),
])
def test_what_a_regression_rules_out_is_refused_at_its_path(changes: dict, path: str, needle: str) -> None:
    for dataset in ("diabetes", "california-housing"):  # the second is not on disk: refused without the data
        with pytest.raises(ScenarioError) as err:
            parse_scenario(reg(**{**changes, "data.dataset": dataset}))
        assert err.value.path == path and needle in err.value.reason, str(err.value)
        assert "\n" not in str(err.value)


def test_an_attack_without_the_refusal_only_fails(monkeypatch) -> None:
    """The refusal is not broader than the fault: past validation, every attack outcome fails."""
    import fedsim.task_checks

    monkeypatch.setattr(fedsim.task_checks, "check_task", lambda scenario: None)
    monkeypatch.setattr(fedsim.task_checks, "check_input_kind", lambda *args: None)  # Attack.inputs: images
    raw = reg(**{"federation.rounds": 1, "federation.local.batch_size": 4,
                 "attacks": [{"name": "inverting_gradients", "budget": {"iterations": 2}}]})
    result = run_scenario(parse_scenario(raw), write=False)
    assert result.outcomes and all(o.failed for o in result.outcomes)


def test_mlp_and_the_regression_defenses_validate_and_run() -> None:
    for extra in ({"model": {"name": "mlp", "width": 2}}, {"defenses": [{"name": "mid"}]},
                  {"defenses": [{"name": "dropout"}], "federation.protocol": "fedavg"}):
        raw = reg(**{"federation.rounds": 1, "federation.clients": 3, **extra})
        result = run_scenario(parse_scenario(raw), write=False)
        assert math.isfinite(result.history[-1]["test_loss"]) and not result.client_failures
    assert setup_for(parse_scenario(reg())).task.kind == "regression"


# -- outputs ---------------------------------------------------------------------------------------------------
def test_every_output_renders_a_run_without_accuracy(written) -> None:
    from fedsim.report.html import render_report
    from fedsim.report.loading import load_metrics, summarize_metrics

    result, out = written
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [h for h in metrics["utility"] if "test_loss" in h]
    assert rows and not any("test_accuracy" in h for h in metrics["utility"])
    final = rows[-1]["test_loss"]
    summary = (out / "summary.md").read_text()
    assert f"{final:.4g} (round 4)" in summary and "no accuracy" in summary
    assert (out / "utility.png").is_file()
    doc = render_report(out).read_text()
    assert "Test loss of the global model per round" in doc
    cell = summarize_metrics(load_metrics(out))
    assert cell["test_accuracy"] is None and cell["test_loss"] == pytest.approx(final)
    from fedsim.bench.store import summarize_run

    assert summarize_run(result)["test_loss"] == pytest.approx(final)
    from fedsim.report.tables import METRICS

    assert "test_loss" in [key for key, _, _ in METRICS]  # the leaderboard has a column for it


def test_a_classification_summary_has_no_regression_loss_line() -> None:
    """The accuracy line and the regression's loss line are exclusive: a classification run that also logs a
    test loss (every one does) must not be described as 'the task has no accuracy'."""
    from fedsim.report.summary import summary_markdown
    from fedsim.scenario import parse_scenario

    scenario = parse_scenario({"name": "cls", "data": {"dataset": "digits"}, "model": {"name": "mlp", "width": 1},
                               "federation": {"clients": 2, "rounds": 2}, "backend": {"kind": "inprocess"}})
    history = [{"round": 1, "test_loss": 2.3, "test_accuracy": 0.1},
               {"round": 2, "test_loss": 2.0, "test_accuracy": 0.3}]
    md = summary_markdown(scenario, history, [], {}, {})
    assert "Test accuracy 0.100 (round 1) -> 0.300 (round 2)." in md
    assert "no accuracy" not in md
    regression = [{"round": 1, "test_loss": 0.14}, {"round": 2, "test_loss": 0.03}]
    assert "the task has no accuracy" in summary_markdown(scenario, regression, [], {}, {})
