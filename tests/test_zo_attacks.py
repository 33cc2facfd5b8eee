"""The curious server's attacks on FZooS messages (fedsim.zo.attacks): extraction is scored against an independent R^2
(sklearn), beats the trivial baselines near the fit, collapses on a masked (SecAgg) message; label-set inference
beats the exact chance value, itself checked by brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sklearn.metrics import r2_score as sk_r2

from fedsim.zo.api import FederatedObjective, GlobalSurrogate, RFFMessage, ZORoundView
from fedsim.zo.attacks import (
    class_logit_directions,
    heldout_points,
    infer_label_set_from_step,
    label_set_chance,
    label_set_scores,
    r2_score,
    rmse,
    score_round,
)
from fedsim.zo.rff import RFFBasis

DIM, M = 4, 400


def _fit_message(basis: RFFBasis, f, center: torch.Tensor, radius: float, n: int, seed: int) -> RFFMessage:
    """A client's min-norm RFF fit of f on n points uniform in center +- radius, fitted here by hand
    (torch.linalg.lstsq), to min-max-normalised values: the message of spec 11.3."""
    gen = torch.Generator().manual_seed(seed)
    pts = center + (torch.rand(n, len(center), generator=gen, dtype=torch.float64) * 2 - 1) * radius
    y = f(pts)
    lo, hi = float(y.min()), float(y.max())
    phi = basis.phi(pts)
    nu = torch.linalg.pinv(phi) @ ((y - lo) / ((hi - lo) or 1.0))
    return RFFMessage(nu=nu, y_min=lo, y_max=hi)


class _Recording:
    """A black box that keeps every point the evaluator queried (to recompute the score by hand)."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self.f, self.calls = f, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        return self.f(x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x[:, 0]) + (x[:, 1] - 0.3) ** 2 + 0.5 * x[:, 2] * x[:, 3]


def _other(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(2 * x[:, 1]) - x[:, 0] + 0.2 * x[:, 3]


def _view(basis: RFFBasis, fs, center: torch.Tensor, radius: float) -> ZORoundView:
    msgs = {i: _fit_message(basis, f, center, radius, 60, seed=i) for i, f in enumerate(fs)}
    w = 1 / len(fs)
    agg = GlobalSurrogate(nu=sum(w * (m.y_max - m.y_min) * m.nu for m in msgs.values()),
                          offset=sum(w * m.y_min for m in msgs.values()))
    return ZORoundView(round=3, x_r=center.clone(), x_next=center.clone(), surrogates=msgs,
                       radius={i: radius for i in msgs}, aggregate=agg)


@pytest.fixture(scope="module")
def basis() -> RFFBasis:
    return RFFBasis(DIM, M, 1.0, 0)


def _objective(fs) -> FederatedObjective:  # noqa: ANN001
    return FederatedObjective(name="toy", dim=DIM, x0=torch.full((DIM,), 0.5, dtype=torch.float64),
                              clients=list(fs), weights=[1 / len(fs)] * len(fs))


def test_r2_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(50, generator=gen, dtype=torch.float64)
    pred = truth + 0.3 * torch.randn(50, generator=gen, dtype=torch.float64)
    assert r2_score(pred, truth) == pytest.approx(sk_r2(truth.numpy(), pred.numpy()), abs=1e-12)
    assert r2_score(torch.full_like(truth, float(truth.mean())), truth) == pytest.approx(0.0, abs=1e-12)
    assert rmse(pred, truth) == pytest.approx(float(((pred - truth) ** 2).mean()) ** 0.5, rel=1e-12)
    # a flat truth (a piecewise-constant metric in a small box): undefined, not -1e25 from rounding
    flat = torch.tensor([0.1 + 0.2] * 49 + [0.3], dtype=torch.float64)  # one value 1 ulp apart: rounding
    assert math.isnan(r2_score(flat + 1e-3, flat))


def test_flat_client_is_counted_and_left_out_of_the_mean(basis: RFFBasis) -> None:
    center = torch.tensor([0.4, 0.6, 0.5, 0.3], dtype=torch.float64)
    flat = lambda x: torch.full((x.shape[0],), 0.7, dtype=torch.float64)  # noqa: E731
    view = _view(basis, [_smooth, flat], center, 0.05)
    out = score_round(view, basis, _objective([_smooth, flat]), heldout=50, seed=0, label_set=False)
    assert math.isnan(out["zo_extraction_r2/client1"])
    assert out["zo_extraction_flat_clients"] == 1.0
    assert out["zo_extraction_r2_mean"] == out["zo_extraction_r2/client0"] > 0.9
    assert out["zo_extraction_rmse_mean"] >= 0.0


def test_extraction_near_fit_is_high_and_beats_baselines(basis: RFFBasis) -> None:
    center = torch.tensor([0.4, 0.6, 0.5, 0.3], dtype=torch.float64)
    boxes = [_Recording(_smooth), _Recording(_other)]
    view = _view(basis, [_smooth, _other], center, 0.05)
    out = score_round(view, basis, _objective(boxes), heldout=100, seed=0, label_set=False)
    # independent recomputation: the points the evaluator queried (fit box first), the surrogate by hand, sklearn R^2
    for i, box in enumerate(boxes):
        pts = box.calls[0]
        assert ((pts - center).abs() <= 0.05 + 1e-12).all()
        msg = view.surrogates[i]
        by_hand = (msg.y_max - msg.y_min) * (basis.phi(pts) @ msg.nu) + msg.y_min
        expected = sk_r2(box.f(pts).numpy(), by_hand.numpy())
        assert out[f"zo_extraction_r2/client{i}"] == pytest.approx(expected, abs=1e-9)
        assert out[f"zo_extraction_r2/client{i}"] > 0.9
    assert out["zo_extraction_r2_mean"] > 0.9
    # margin over what the server has without the individual message
    assert out["zo_extraction_r2_mean"] > out["zo_extraction_r2_midpoint_mean"] + 0.9
    assert out["zo_extraction_r2_mean"] > out["zo_extraction_r2_global_mean"] + 0.5
    assert out["zo_extraction_r2_wide_mean"] < out["zo_extraction_r2_mean"]  # decays away from the fit


def _secagg_view(basis: RFFBasis, view: ZORoundView, mask_std: float) -> ZORoundView:
    """The same round under SecAgg, built by hand: each client sends its weighted share w_i (y_max - y_min) nu_i
    plus pairwise masks (+m_ij for the lower id, -m_ij for the higher), offset w_i y_min plus a mask, no range; the
    server sums the shares (the masks cancel)."""
    ids = sorted(view.surrogates)
    w = 1 / len(ids)
    gen = torch.Generator().manual_seed(7)
    masks = {i: torch.zeros(M + 1, dtype=torch.float64) for i in ids}
    for a, b in itertools.combinations(ids, 2):
        m = torch.randn(M + 1, generator=gen, dtype=torch.float64) * mask_std
        masks[a] += m
        masks[b] -= m
    shares = {}
    for i in ids:
        msg = view.surrogates[i]
        off = w * msg.y_min + float(masks[i][-1])
        shares[i] = RFFMessage(nu=w * (msg.y_max - msg.y_min) * msg.nu + masks[i][:-1], y_min=off, y_max=off)
    agg = GlobalSurrogate(nu=sum(s.nu for s in shares.values()), offset=sum(s.y_min for s in shares.values()))
    return ZORoundView(round=view.round, x_r=view.x_r, x_next=view.x_next, surrogates=shares, radius=view.radius,
                       aggregate=agg, secagg=True)


def test_masked_message_collapses_to_baseline(basis: RFFBasis) -> None:
    center = torch.tensor([0.4, 0.6, 0.5, 0.3], dtype=torch.float64)
    fs = [_smooth, _other]
    plain = _view(basis, fs, center, 0.05)
    clear = score_round(plain, basis, _objective(fs), heldout=100, seed=0, label_set=False)
    # without masks the server's reading of a share (divided by w_i) is the client's surrogate again
    unmasked = score_round(_secagg_view(basis, plain, 0.0), basis, _objective(fs), heldout=100, seed=0,
                           label_set=False)
    assert unmasked["zo_is_masked"] == 1.0
    assert unmasked["zo_extraction_r2_mean"] == pytest.approx(clear["zo_extraction_r2_mean"], abs=1e-6)
    masked = score_round(_secagg_view(basis, plain, 100.0), basis, _objective(fs), heldout=100, seed=0,
                         label_set=False)
    assert masked["zo_is_masked"] == 1.0 and clear["zo_is_masked"] == 0.0
    assert masked["zo_extraction_r2_mean"] < 0.0  # no better than the best constant
    assert masked["zo_extraction_r2_mean"] < masked["zo_extraction_r2_global_mean"]  # the sum survives, not nu_i
    assert masked["zo_extraction_r2_global_mean"] == pytest.approx(clear["zo_extraction_r2_global_mean"], abs=1e-6)


def _label_objective(held: list[list[int]], num_classes: int, dim: int) -> FederatedObjective:
    """Client i's f rises along the bias of every class it does not hold and falls along those it holds (the
    metric task's sign pattern), plus a smooth nuisance term on the other coordinates."""

    def make(h: list[int]):  # noqa: ANN202
        sign = torch.ones(num_classes, dtype=torch.float64)
        sign[h] = -1.0
        return lambda x: (x[:, :num_classes] * sign).sum(1) + torch.sin(2 * x[:, num_classes:]).sum(1)

    obj = FederatedObjective(name="labels", dim=dim, x0=torch.full((dim,), 0.5, dtype=torch.float64),
                             clients=[make(h) for h in held], weights=[1 / len(held)] * len(held))
    obj.truth = {"classes": held, "bias_slice": (0, num_classes)}  # the metric task's (start, stop)
    return obj


def test_label_set_inference_beats_exact_chance() -> None:
    num_classes, dim = 6, 8
    held = [[0, 2], [1, 5], [3, 4]]
    basis = RFFBasis(dim, 600, 1.0, 1)
    obj = _label_objective(held, num_classes, dim)
    center = torch.full((dim,), 0.5, dtype=torch.float64)
    msgs = {i: _fit_message(basis, f, center, 0.05, 80, seed=i) for i, f in enumerate(obj.clients)}
    # the client's local steps raise the biases of the classes it holds (its surrogate slope there is negative)
    local = {i: center + 0.01 * torch.tensor([1.0 if k in h else -1.0 for k in range(num_classes)]
                                             + [0.0] * (dim - num_classes), dtype=torch.float64)
             for i, h in enumerate(held)}
    view = ZORoundView(round=1, x_r=center, x_next=center, local=local, surrogates=msgs,
                       radius={i: 0.05 for i in msgs})
    out = score_round(view, basis, obj, heldout=20, seed=0, extraction=False)
    chance_acc, chance_jac = label_set_chance(num_classes, 2, 2)
    assert out["zo_label_set_chance"] == pytest.approx(chance_acc)
    assert out["zo_label_set_jaccard_chance"] == pytest.approx(chance_jac)
    assert out["zo_label_set_accuracy_mean"] == 1.0 > chance_acc + 0.3
    assert out["zo_label_set_jaccard_mean"] == 1.0
    assert out["zo_label_set_step_accuracy_mean"] == 1.0


def test_step_statistic_reads_the_raised_biases() -> None:
    x_r = torch.zeros(5, dtype=torch.float64)
    x_local = torch.tensor([0.1, -0.2, 0.3, 0.0, 9.0], dtype=torch.float64)  # coordinate 4 is not a bias
    assert infer_label_set_from_step(x_r, x_local, class_logit_directions(5, (0, 4)), 2) == [0, 2]
    assert infer_label_set_from_step(x_r, x_local, class_logit_directions(5, (1, 3)), 1) == [1]  # (start, stop)


def test_class_logit_directions_by_hand() -> None:
    # x = [W (h=2, C=3) row-major | b (3)]: raising logit k = +1 on W[0, k], W[1, k] and b[k]
    got = class_logit_directions(9, (6, 9), (0, 6))
    expected = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                             [0, 1, 0, 0, 1, 0, 0, 1, 0],
                             [0, 0, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.float64)
    assert torch.equal(got, expected)
    assert torch.equal(class_logit_directions(4, slice(1, 3)), torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]],
                                                                            dtype=torch.float64))
    with pytest.raises(ValueError, match="not \\(hidden, 3\\)"):
        class_logit_directions(9, (6, 9), (0, 5))


def test_label_set_scores_by_hand() -> None:
    assert label_set_scores([0, 1], [1, 2], 5) == (pytest.approx(3 / 5), pytest.approx(1 / 3))
    assert label_set_scores([], [], 4) == (1.0, 1.0)


@pytest.mark.parametrize(("c", "k", "n"), [(7, 2, 2), (7, 3, 3), (10, 2, 5), (5, 0, 2), (6, 6, 1), (4, 4, 4)])
def test_chance_matches_enumeration(c: int, k: int, n: int) -> None:
    truth = list(range(k))
    subsets = list(itertools.combinations(range(c), n))
    acc = sum(label_set_scores(s, truth, c)[0] for s in subsets) / len(subsets)
    jac = sum(label_set_scores(s, truth, c)[1] for s in subsets) / len(subsets)
    got = label_set_chance(c, k, n)
    assert got[0] == pytest.approx(acc, abs=1e-12)
    assert got[1] == pytest.approx(jac, abs=1e-12)


def test_heldout_points_stay_in_box_and_unit_cube() -> None:
    center = torch.tensor([0.0, 0.5, 0.99], dtype=torch.float64)
    pts = heldout_points(center, 0.1, 500, torch.Generator().manual_seed(0))
    assert pts.shape == (500, 3)
    assert (pts >= 0).all() and (pts <= 1).all()
    assert ((pts - center).abs() <= 0.1 + 1e-12).all()
    assert not math.isclose(float(pts[:, 1].std()), 0.0)


def test_report_section_shows_objective_queries_and_attack_table(tmp_path) -> None:  # noqa: ANN001
    from fedsim.zo.report import RunInfo, attack_table_markdown, zo_markdown
    from fedsim.zo.report_html import zo_report_sections

    rows = [{"round": 0.0, "zo_objective": 1.0, "zo_queries": 0.0},
            {"round": 1.0, "zo_objective": 0.5, "zo_queries": 70.0, "zo_queries_round": 70.0,
             "zo_attacked_clients": 2.0, "zo_extraction_r2_mean": 0.9, "zo_extraction_flat_clients": 0.0,
             "zo_label_set_accuracy_mean": 0.75, "zo_label_set_chance": 0.5},
            {"round": 2.0, "zo_objective": 0.25, "zo_queries": 140.0, "zo_queries_round": 70.0,
             "zo_attacked_clients": 2.0, "zo_extraction_r2_mean": 0.7, "zo_extraction_flat_clients": 0.0,
             "zo_label_set_accuracy_mean": 0.25, "zo_label_set_chance": 0.5}]
    scn = {"federation": {"clients": 2}, "zeroth_order": {"method": "fzoos", "task": {"family": "metric"},
                                                          "defenses": {"ridge": 0.1, "secagg": False}}}
    md = "\n".join(zo_markdown(rows, RunInfo.from_scenario(scn)))
    assert "1 (round 0) -> 0.25 (round 2) after 140 queries" in md
    assert "| 2 | 0.25 | 70 | 140 |" in md
    assert "| mean of 2 rounds |  | 0.800 |" in md and md.count("| 0.500 | 0.500 |") == 1  # means; no local-step column
    assert attack_table_markdown({"ridge 0.1": rows})[-1].startswith("| ridge 0.1 | 0.800 |")
    html = "".join(zo_report_sections(scn, {"utility": rows}, tmp_path, "leaderboard.csv"))
    assert (tmp_path / "zo_objective.png").is_file() and "data:image/png;base64," in html
    assert attack_table_markdown({"none": rows[:1]}) == []  # nothing attacked, no table
    small = [{**rows[1], "zo_extraction_rmse_mean": 0.0054, "zo_extraction_r2_mean": -7.5e12}]
    line = attack_table_markdown({"secagg": small})[-1]
    assert "| secagg | -7.5e+12 |" in line and "| 0.0054 |" in line  # never '0.005' or '-7500000000000.000'

    assert zo_markdown([{"round": 1.0}], RunInfo()) == []
