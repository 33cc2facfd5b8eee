"""The zeroth-order task families (fedsim.zo.tasks): values against independent computations, closed forms,
determinism, the per-process cache, and the validation errors (spec algorithms-more.md §11.7)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fedsim.errors import ScenarioError
from fedsim.zo.spec import ZerothOrderSpec, ZOTask
from fedsim.zo.tasks import TASKS, build_objective, check_task


def _spec(**task: object) -> ZerothOrderSpec:
    return ZerothOrderSpec(task=ZOTask(**task))


# ---------------------------------------------------------------- quadratic


def _quadratic_by_loop(x: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> float:
    """f_i by a plain Python loop over coordinates (the authors' formula, spec §11.7)."""
    d = len(x)
    total = 1.0
    for j in range(d):
        p = min(max(x[j], 0.0), 1.0) / 1.0 * 20.0 - 10.0
        total += c1[j] * p * p + c2[j] * p
    return 0.1 / d * total


def test_quadratic_values_match_a_loop_and_coefficients_follow_the_dirichlet_rule() -> None:
    obj = build_objective(_spec(family="quadratic", dim=7, heterogeneity=0.5), 3, seed=5)
    assert obj.dim == 7 and len(obj.clients) == 3 and obj.weights == [1 / 3] * 3
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.2, 1.2, size=(4, 7))  # outside the box too: clipped first
    for f in obj.clients:
        c1, c2 = f.c1, f.c2
        out = f(torch.from_numpy(pts))
        assert out.dtype == torch.float64 and out.shape == (4,)
        for k in range(4):
            assert float(out[k]) == pytest.approx(_quadratic_by_loop(pts[k], c1, c2), rel=1e-12)
    # 1 + div * (D - 1/N): each coordinate's coefficients average to 1 over clients and lie in [1 - div/N, ...]
    c1s = np.stack([f.c1 for f in obj.clients])
    np.testing.assert_allclose(c1s.mean(axis=0), 1.0, atol=1e-12)
    assert (c1s >= 1 - 0.5 / 3 - 1e-12).all() and (c1s <= 1 + 0.5 * (1 - 1 / 3) + 1e-12).all()


def test_quadratic_closed_form_minimiser_beats_random_points() -> None:
    obj = build_objective(_spec(family="quadratic", dim=20, heterogeneity=0.9), 5, seed=1)
    x_star = torch.full((20,), 0.475, dtype=torch.float64)  # p = -0.5 in every coordinate
    f_star = obj.value(x_star)
    assert f_star == pytest.approx(0.1 / 20 - 0.025, abs=1e-12)
    assert f_star == pytest.approx(obj.truth["global_minimum"], abs=1e-12)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        x = torch.rand(20, generator=gen, dtype=torch.float64)
        assert obj.value(x) > f_star
    # and nudging one coordinate either way from the minimiser raises F (a minimum, not a saddle)
    for j in (0, 19):
        for step in (-1e-3, 1e-3):
            moved = x_star.clone()
            moved[j] += step
            assert obj.value(moved) > f_star


def test_quadratic_zero_heterogeneity_gives_identical_clients() -> None:
    obj = build_objective(_spec(family="quadratic", dim=9, heterogeneity=0.0), 4, seed=2)
    pts = torch.rand(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = obj.clients[0](pts)
    for f in obj.clients[1:]:
        assert torch.equal(f(pts), first)
    hetero = build_objective(_spec(family="quadratic", dim=9, heterogeneity=0.5), 4, seed=2)
    assert not torch.equal(hetero.clients[0](pts), hetero.clients[1](pts))


def test_quadratic_default_dim_x0_and_seed_determinism() -> None:
    a = build_objective(_spec(family="quadratic"), 5, seed=11)
    assert a.dim == 300 and a.x0.shape == (300,) and a.x0.dtype == torch.float64
    assert 0 <= float(a.x0.min()) and float(a.x0.max()) <= 1
    b = build_objective(_spec(family="quadratic"), 5, seed=11)
    c = build_objective(_spec(family="quadratic"), 5, seed=12)
    assert torch.equal(a.x0, b.x0) and not torch.equal(a.x0, c.x0)
    assert a.value(a.x0) == b.value(b.x0) != c.value(a.x0)


# ---------------------------------------------------------------- registry, cache, pickling


def test_registry_lists_the_families() -> None:
    assert "quadratic" in TASKS
    assert TASKS.get("quadratic").build is not None


def test_build_returns_an_independent_copy_and_clients_pickle() -> None:
    spec = _spec(family="quadratic", dim=5)
    a = build_objective(spec, 2, seed=0)
    a.x0.add_(1.0)
    a.truth["global_minimum"] = "changed"
    b = build_objective(spec, 2, seed=0)
    assert float(b.x0.max()) <= 1.0 and b.truth["global_minimum"] != "changed"
    pts = torch.rand(3, 5, dtype=torch.float64)
    clone = pickle.loads(pickle.dumps(b.clients[1]))
    assert torch.equal(clone(pts), b.clients[1](pts))


def test_quadratic_refuses_fields_it_does_not_read() -> None:
    for field, value in (("dataset", "digits"), ("class_portion", 0.5), ("metric", "f1"), ("box", 0.1),
                         ("image_index", 0)):
        with pytest.raises(ScenarioError) as info:
            check_task(_spec(family="quadratic", **{field: value}), 3)
        assert info.value.path == f"task.{field}"
    check_task(_spec(family="quadratic", dim=4, heterogeneity=1.0), 3)  # what it reads is fine


# ---------------------------------------------------------------- metric


def _sklearn_classifier_like(coefs: list[np.ndarray], intercepts: list[np.ndarray]):
    """A scikit-learn MLPClassifier carrying the given parameters (fitted once on dummy data for its classes)."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(30, 14), max_iter=1)
    n_in, c = coefs[0].shape[0], coefs[-1].shape[1]
    with pytest.warns(Warning):  # ConvergenceWarning
        clf.fit(np.zeros((c, n_in)), np.arange(c))
    clf.coefs_ = [w.copy() for w in coefs]
    clf.intercepts_ = [b.copy() for b in intercepts]
    return clf


def _metric_expected(obj, i: int, x: np.ndarray, metric: str) -> float:
    """1 - sklearn macro-<metric> of sklearn's own predict with x added to the last two layers, as documented:
    [coefs_[1] (30,14) row-major, intercepts_[1] (14,), coefs_[2] (14,C), intercepts_[2] (C,)]."""
    from sklearn import metrics as skm

    from fedsim.zo.tasks.metric import trained_classifier

    base = trained_classifier(obj.truth["dataset"])
    delta = (np.clip(x, 0, 1) * 2 - 1) * obj.truth["box"]
    c = base.num_classes
    cuts = np.cumsum([0, 420, 14, 14 * c, c])
    coefs = [base.coefs[0], base.coefs[1] + delta[cuts[0]:cuts[1]].reshape(30, 14),
             base.coefs[2] + delta[cuts[2]:cuts[3]].reshape(14, c)]
    intercepts = [base.intercepts[0], base.intercepts[1] + delta[cuts[1]:cuts[2]],
                  base.intercepts[2] + delta[cuts[3]:cuts[4]]]
    idx = np.asarray(obj.truth["pool_indices"][i])
    pred = _sklearn_classifier_like(coefs, intercepts).predict(base.pool_x[idx])
    score = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score,
             "jaccard": skm.jaccard_score}[metric]
    return 1.0 - score(base.pool_y[idx], pred, average="macro", zero_division=0)


@pytest.mark.parametrize("metric", ["f1", "precision", "recall", "jaccard"])
def test_metric_values_equal_sklearn_scores_of_the_perturbed_classifier(metric: str) -> None:
    obj = build_objective(_spec(family="metric", dataset="digits", class_portion=0.7, metric=metric, box=1.5), 4,
                          seed=3)
    assert obj.dim == 420 + 14 + 140 + 10
    rng = np.random.default_rng(1)
    pts = np.vstack([np.full(obj.dim, 0.5), rng.uniform(0, 1, size=(5, obj.dim))])
    seen = set()
    for i, f in enumerate(obj.clients):
        out = f(torch.from_numpy(pts))
        assert out.shape == (6,) and out.dtype == torch.float64
        for k in range(6):
            assert float(out[k]) == pytest.approx(_metric_expected(obj, i, pts[k], metric), abs=1e-12)
            seen.add(round(float(out[k]), 6))
    assert len(seen) > 10  # the perturbations really change the predictions


def test_metric_x0_is_the_independently_trained_classifier_and_truth_matches_the_split() -> None:
    from sklearn.metrics import f1_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from fedsim.data.bundled import load_bundled
    from fedsim.scenario import DataSpec

    obj = build_objective(_spec(family="metric", dataset="digits"), 4, seed=0)  # portion 0.9, f1, box 0.2
    bundle = load_bundled("digits", DataSpec(dataset="digits", test_fraction=0.5))
    tr = bundle.train_x.reshape(len(bundle.train_x), -1).double().numpy()
    te = bundle.test_x.reshape(len(bundle.test_x), -1).double().numpy()
    scaler = StandardScaler().fit(np.concatenate([tr, te]))
    with pytest.warns(Warning):
        clf = MLPClassifier(solver="lbfgs", alpha=1e-5, hidden_layer_sizes=(30, 14), max_iter=10,
                            random_state=1).fit(scaler.transform(tr), bundle.train_y.numpy())
    test_y = bundle.test_y.numpy()
    assert obj.truth["num_classes"] == 10 and obj.truth["bias_slice"] == (574, 584)
    owned = sorted(c for cls in obj.truth["classes"] for c in cls)
    assert owned == list(range(10)) and sorted(len(c) for c in obj.truth["classes"]) == [2, 2, 3, 3]
    all_idx = np.concatenate([np.asarray(p) for p in obj.truth["pool_indices"]])
    assert len(np.unique(all_idx)) == len(all_idx) == len(test_y)  # disjoint, covering the held-out half
    for i, f in enumerate(obj.clients):
        idx = np.asarray(obj.truth["pool_indices"][i])
        expected = 1.0 - f1_score(test_y[idx], clf.predict(scaler.transform(te[idx])), average="macro")
        assert float(f(obj.x0[None])[0]) == pytest.approx(expected, abs=1e-12)
        counts = np.bincount(test_y[idx], minlength=10)
        assert counts.tolist() == obj.truth["class_counts"][i]
        own_share = counts[obj.truth["classes"][i]].sum() / counts.sum()
        k = len(obj.truth["classes"][i])  # own classes take 0.9 each, the others 0.1 / (N - 1) each
        assert own_share == pytest.approx(0.9 * k / (0.9 * k + (10 - k) * 0.1 / 3), abs=0.02)
    equal = build_objective(_spec(family="metric", dataset="digits", class_portion=0.6), 10, seed=0)  # N = C
    for own, counts in zip(equal.truth["classes"], equal.truth["class_counts"], strict=True):
        assert np.asarray(counts)[own].sum() / sum(counts) == pytest.approx(0.6, abs=0.03)


def test_metric_output_biases_sit_where_truth_says() -> None:
    """Pushing one output bias far up makes every prediction that class: the value has a closed form."""
    obj = build_objective(_spec(family="metric", class_portion=1.0, box=1000.0), 5, seed=4)  # mnist-5k default
    assert obj.truth["dataset"] == "mnist-5k" and obj.dim == 584
    start, stop = obj.truth["bias_slice"]
    for i, f in enumerate(obj.clients):
        counts = np.asarray(obj.truth["class_counts"][i])
        m = counts.sum()
        for k in (0, 7):
            x = torch.full((1, obj.dim), 0.5, dtype=torch.float64)
            x[0, start + k] = 1.0  # +1000 on class k's bias
            present = set(np.flatnonzero(counts)) | {k}
            expected_f1 = 2 * counts[k] / (m + counts[k]) / len(present)  # only class k can score
            assert float(f(x)[0]) == pytest.approx(1 - expected_f1, abs=1e-12)
        assert set(np.flatnonzero(counts)) == set(obj.truth["classes"][i])  # portion 1: only own classes


def test_metric_refuses_bad_combinations() -> None:
    cases = [({"dataset": "covtype"}, 3, "task.dataset", "unknown"),
             ({"dataset": "cifar10"}, 3, "task.dataset", "a fedsim dataset, but"),
             ({}, 11, "federation.clients", "11 clients"),
             ({"heterogeneity": 0.5}, 3, "task.heterogeneity", "not used"),
             ({"dim": 10}, 3, "task.dim", "not used"),
             ({"image_index": 2}, 3, "task.image_index", "not used")]
    for fields, n, path, words in cases:
        with pytest.raises(ScenarioError, match=words) as info:
            check_task(_spec(family="metric", **fields), n)
        assert info.value.path == path


# ---------------------------------------------------------------- adversarial


def _torch_margin(weights, image: np.ndarray, label: int, x: np.ndarray, box: float) -> float:
    """The C&W margin by a torch forward pass of the client's MLP on clip(image + (2x-1)*box, 0, 1)."""
    w1, b1, w2, b2 = (torch.from_numpy(np.asarray(w)) for w in weights)
    model = torch.nn.Sequential(torch.nn.Linear(w1.shape[0], w1.shape[1]), torch.nn.ReLU(),
                                torch.nn.Linear(w2.shape[0], w2.shape[1])).double()
    with torch.no_grad():
        model[0].weight.copy_(w1.T)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2.T)
        model[2].bias.copy_(b2)
        adv = torch.clamp(torch.from_numpy(image) + (torch.from_numpy(x).clamp(0, 1) * 2 - 1) * box, 0, 1)
        z = model(adv[None])[0]
    top2 = torch.topk(torch.cat([z[:label], z[label + 1:]]), 1).values[0]
    return float(z[label] - top2)


def test_adversarial_margins_equal_a_torch_forward_pass_on_the_shared_image() -> None:
    from fedsim.data.bundled import load_bundled
    from fedsim.scenario import DataSpec
    from fedsim.zo.tasks.adversarial import client_models

    obj = build_objective(_spec(family="adversarial", dataset="digits", class_portion=0.8), 5, seed=7)
    assert obj.dim == 64 and obj.success_below == 0.0 and obj.truth["classes"] == [[0, 5], [1, 6], [2, 7],
                                                                                     [3, 8], [4, 9]]
    bundle = load_bundled("digits", DataSpec(dataset="digits", test_fraction=0.2))
    t = obj.truth["test_index"]
    image = bundle.test_x[t].reshape(-1).double().numpy()
    label = int(bundle.test_y[t])
    assert label == obj.truth["label"]
    models = client_models("digits", 5, 0.8)
    rng = np.random.default_rng(2)
    pts = np.vstack([np.full(64, 0.5), rng.uniform(-0.1, 1.1, size=(4, 64))])
    for i, f in enumerate(obj.clients):
        out = f(torch.from_numpy(pts))
        for k in range(5):
            assert float(out[k]) == pytest.approx(_torch_margin(models.weights[i], image, label, pts[k], 0.3),
                                                  abs=1e-9)
    assert obj.value(obj.x0) >= 0.0  # an eligible image: not misclassified before the attack
    # eligibility counted independently: mean torch margin >= 0 over the test images
    eligible = 0
    for j in range(len(bundle.test_y)):
        img = bundle.test_x[j].reshape(-1).double().numpy()
        mean = np.mean([_torch_margin(w, img, int(bundle.test_y[j]), np.full(64, 0.5), 0.3)
                        for w in models.weights])
        eligible += mean >= 0
    assert eligible == obj.truth["eligible"]


def test_adversarial_default_is_mnist_784_and_the_seed_picks_the_image() -> None:
    spec = _spec(family="adversarial")
    a, b = build_objective(spec, 10, seed=0), build_objective(spec, 10, seed=1)
    assert a.dim == 784 and torch.equal(a.x0, torch.full((784,), 0.5, dtype=torch.float64))
    assert a.truth["test_index"] != b.truth["test_index"]
    assert a.value(a.x0) >= 0 and b.value(b.x0) >= 0
    # the box edge is far from x0: all-ones x (the +0.3 corner) changes the margins
    assert a.value(torch.ones(784, dtype=torch.float64)) != a.value(a.x0)


def test_adversarial_refuses_bad_combinations() -> None:
    from fedsim.zo.tasks.adversarial import client_models

    eligible = len(client_models("digits", 5, 0.9).eligible)
    with pytest.raises(ScenarioError, match="beyond") as info:
        check_task(_spec(family="adversarial", dataset="digits", image_index=eligible), 5)
    assert info.value.path == "task.image_index"
    check_task(_spec(family="adversarial", dataset="digits", image_index=eligible - 1), 5)
    # clients that only ever saw their own classes misclassify every image on average: nothing to attack, so
    # validation refuses it (it used to pass and the run to fail)
    assert len(client_models("digits", 5, 1.0).eligible) == 0
    with pytest.raises(ScenarioError, match="misclassify every test image") as info:
        check_task(_spec(family="adversarial", dataset="digits", class_portion=1.0), 5)
    assert info.value.path == "task.class_portion"
    for fields, path in (({"metric": "f1"}, "task.metric"), ({"heterogeneity": 0.1}, "task.heterogeneity"),
                         ({"dataset": "mnist-mini"}, "task.dataset")):
        with pytest.raises(ScenarioError) as info:
            check_task(_spec(family="adversarial", **fields), 5)
        assert info.value.path == path


# ---------------------------------------------------------------- determinism across processes


def _family_values() -> str:
    """Each family's client values at fixed points, x0 and classes, as text (3 clients, seed 9)."""
    lines = []
    for task in (ZOTask(family="quadratic", dim=6), ZOTask(family="metric", dataset="digits", class_portion=0.8),
                 ZOTask(family="adversarial", dataset="digits", class_portion=0.8)):
        obj = build_objective(ZerothOrderSpec(task=task), 3, seed=9)
        pts = torch.rand(3, obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        lines.append(repr((task.family, [f(pts).tolist() for f in obj.clients], obj.x0.tolist(),
                           obj.truth.get("classes"))))
    return "\n".join(lines)


def test_every_family_rebuilds_bit_for_bit_in_another_process_with_other_threads() -> None:
    """What a Ray actor rebuilds must equal what this process built: same values, x0 and truth, whatever the
    thread count or hash seed of the process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch; torch.set_num_threads(2); sys.path.insert(0, sys.argv[1]); "
            "from test_zo_tasks import _family_values; print(_family_values())")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2"}
    other = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                           env=env, timeout=180, check=True).stdout
    assert other.strip() == _family_values() and other.count("\n") == 3


def test_every_family_client_pickles_and_answers_batches() -> None:
    for task in (ZOTask(family="quadratic", dim=6), ZOTask(family="metric", dataset="digits", class_portion=0.8),
                 ZOTask(family="adversarial", dataset="digits", class_portion=0.8)):
        obj = build_objective(ZerothOrderSpec(task=task), 5, seed=9)
        pts = torch.rand(4, obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for f in obj.clients:
            out = f(pts)
            assert out.shape == (4,) and out.dtype == torch.float64
            assert torch.equal(pickle.loads(pickle.dumps(f))(pts), out)
            assert torch.equal(f(pts[2]), out[2:3])  # one point (d,) is a batch of one
            with pytest.raises(ValueError, match="query batch"):
                f(pts[:, :-1])


def test_adversarial_client_training_is_torch_adam() -> None:
    """The written-out optimizer (no torch.optim import cost) follows torch.optim.Adam step for step."""
    from torch import nn

    from fedsim.isolation import seeded_global_rngs
    from fedsim.zo.tasks import adversarial

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 12, generator=gen), torch.randint(0, 4, (60,), generator=gen)
    got = adversarial._train(x, y, 4, seed=3)
    with seeded_global_rngs(3):
        model = nn.Sequential(nn.Linear(12, adversarial.HIDDEN), nn.ReLU(), nn.Linear(adversarial.HIDDEN, 4))
    opt = torch.optim.Adam(model.parameters(), lr=adversarial.LR, weight_decay=adversarial.WEIGHT_DECAY)
    for _ in range(adversarial.STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    want = (model[0].weight.T, model[0].bias, model[2].weight.T, model[2].bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b.detach().double().numpy(), atol=1e-5)
