"""Text leakage metrics (fedsim.metrics.text) and their dispatch in score_reconstruction / judge.

Expected values are independent of the code under test: ROUGE by hand on tiny id sequences and, for random ones,
from a brute-force LCS (every subsequence enumerated) and n-gram multisets counted with Counter; token and bag
precision/recall by Counter/set arithmetic; the matching against a known permutation.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from fedsim.attacking import judge
from fedsim.metrics import METRIC_DIRECTIONS, score_reconstruction
from fedsim.metrics.text import TEXT_METRIC_DIRECTIONS, rouge_f, score_text, trivial_guesses
from fedsim.threat import GroundTruth, Reconstruction


def brute_lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence: the longest subsequence of ``a`` (all enumerated) found in ``b``."""
    def is_subsequence(sub: tuple[int, ...], seq: list[int]) -> bool:
        it = iter(seq)
        return all(any(x == y for y in it) for x in sub)

    for n in range(min(len(a), len(b)), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, n)):
            return n
    return 0


def f_measure(overlap: int, n_pred: int, n_true: int) -> float:
    return 2 * overlap / (n_pred + n_true) if overlap else 0.0


def ngram_f(pred: list[int], true: list[int], n: int) -> float:
    grams = [Counter(tuple(s[i:i + n]) for i in range(len(s) - n + 1)) for s in (pred, true)]
    return f_measure(sum((grams[0] & grams[1]).values()), sum(grams[0].values()), sum(grams[1].values()))


def text_truth(x: torch.Tensor, labels: torch.Tensor | None = None) -> GroundTruth:
    return GroundTruth(0, 0, x, x if labels is None else labels)


def test_rouge_by_hand() -> None:
    """truth 1 2 3 4 5, recovered 1 2 4 3 6: 4 shared unigrams of 5 (F 0.8), 1 shared bigram of 4 (1 2: F 0.25),
    LCS 3 (1 2 3 or 1 2 4: F 0.6)."""
    scores = rouge_f([1, 2, 4, 3, 6], [1, 2, 3, 4, 5])
    assert scores == pytest.approx({"rouge1": 0.8, "rouge2": 0.25, "rougeL": 0.6})
    # an unfilled position (-1) is no token: 2 of 2 recovered right, 2 of 4 true found -> F 2/3; bigram (1, 3)
    # is not one of the truth's
    scores = rouge_f([1, -1, 3, -1], [1, 2, 3, 4])
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.0, "rougeL": 2 / 3})
    # ids are not text: 12 is not 1 2, and nothing is lowercased or stemmed away
    assert rouge_f([12], [1, 2])["rouge1"] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_rouge_matches_brute_force_lcs_and_ngrams(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 5, (7,), generator=gen).tolist()
    true = torch.randint(0, 5, (8,), generator=gen).tolist()
    scores = rouge_f(pred, true)
    assert scores["rougeL"] == pytest.approx(f_measure(brute_lcs(pred, true), len(pred), len(true)))
    assert scores["rouge1"] == pytest.approx(ngram_f(pred, true, 1))
    assert scores["rouge2"] == pytest.approx(ngram_f(pred, true, 2))


def test_matching_undoes_a_permutation_and_keeps_exact_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 50, (5, 8), generator=gen)
    noisy = truth.clone()
    noisy[1, 3] = 99  # one wrong token in true sequence 1's reconstruction
    noisy[3, :4] = 98  # half of sequence 3 wrong
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = score_text(noisy[perm], None, truth)
    order = out["order"]
    assert [int(perm[j]) for j in order] == list(range(5))  # recovered[order[i]] is truth i's reconstruction
    assert out["num_exact_seq"] == 3 and out["exact_seq_rate"] == pytest.approx(3 / 5)
    expected = [ngram_f(noisy[i].tolist(), truth[i].tolist(), 1) for i in range(5)]
    assert out["rouge1_mean"] == pytest.approx(sum(expected) / 5)
    assert out["rouge1_best"] == 1.0
    lcs = [brute_lcs(noisy[i].tolist(), truth[i].tolist()) / 8 for i in range(5)]  # equal lengths: F = LCS / T
    assert out["rougeL_per_seq"] == pytest.approx(lcs)
    assert "oracle_selection" not in out


def test_missing_sequences_score_as_the_empty_guess() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    out = score_text(torch.tensor([[5, 6, 7, 0]]), None, truth)  # one of three, 3 of 4 tokens right
    assert out["order"].count(-1) == 2
    assert out["rouge1_mean"] == pytest.approx(0.75 / 3) and out["rouge1_best"] == pytest.approx(0.75)
    assert out["exact_seq_rate"] == 0.0
    assert out["token_precision"] == pytest.approx(3 / 4) and out["token_recall"] == pytest.approx(3 / 12)
    empty = score_text(torch.zeros((0, 4), dtype=torch.int64), None, truth)  # ran, isolated nothing: measured
    assert "failed" not in empty and empty["rougeL_mean"] == 0.0 and empty["num_reconstructed"] == 0
    assert not any(k.endswith("_best") for k in empty)


def test_surplus_sequences_are_an_oracle_selection_paid_for() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    guesses = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [1, 2, 3, 9]])
    out = score_text(guesses, None, truth)
    assert out["oracle_selection"] is True and out["surplus_sequences"] == 2
    assert out["rouge1_mean_selected"] == 1.0 and out["rouge1_mean"] == pytest.approx(2 / 4)  # 2 surplus at 0
    assert out["exact_seq_rate_selected"] == 1.0 and out["exact_seq_rate"] == pytest.approx(2 / 4)
    # pooled multiset over everything returned: 8 true tokens, 16 returned, 8 of them shared
    returned, true = Counter(guesses.flatten().tolist()), Counter(truth.flatten().tolist())
    overlap = sum((returned & true).values())
    assert out["token_precision"] == pytest.approx(overlap / 16) and out["token_recall"] == pytest.approx(overlap / 8)
    oracle, reasons, _, _ = judge(out, asked=2)
    assert oracle and "selection" in reasons[0]
    assert judge(out, asked=4)[0] is False  # the count its view declared: an honest estimate, not an oracle


def test_token_multiset_and_bag_precision_recall() -> None:
    truth = torch.tensor([[3, 3, 4, 5], [5, 6, 6, 6]])
    rec = torch.tensor([[3, 4, 4, -1], [6, 6, 7, 8]])
    out = score_text(rec, None, truth)
    filled = [t for t in rec.flatten().tolist() if t >= 0]
    overlap = sum((Counter(filled) & Counter(truth.flatten().tolist())).values())  # 3, 4, 6, 6
    assert out["token_precision"] == pytest.approx(overlap / len(filled))
    assert out["token_recall"] == pytest.approx(overlap / 8)
    bag = torch.tensor([3, 4, 7, 9])
    bag_out = score_text(None, bag, truth)
    found, used = set(bag.tolist()), set(truth.flatten().tolist())
    assert bag_out["token_set_precision"] == pytest.approx(len(found & used) / len(found))
    assert bag_out["token_set_recall"] == pytest.approx(len(found & used) / len(used))
    assert not any(k.startswith("rouge") for k in bag_out)  # a bag is no sequence: no sequence metrics
    # the distinct ids of the sequences when the attack gives no set
    assert out["token_set_recall"] == pytest.approx(len(set(filled) & used) / len(used))


@pytest.mark.parametrize("tokens, token_set", [
    (torch.rand(2, 4), None),  # float
    (torch.tensor([1, 2, 3, 4]), None),  # 1-D
    (torch.zeros(2, 4, 1, dtype=torch.int64), None),  # 3-D
    (torch.zeros(2, 5, dtype=torch.int64), None),  # another T
    (torch.tensor([[1, 2, -7, 4]]), None),  # ids below -1
    ([[1, 2, 3, 4]], None),  # not a tensor
    (torch.ones(2, 4, dtype=torch.bool), None),
    (None, torch.ones(2, 2, dtype=torch.int64)),  # a 2-D set
    (None, torch.tensor([float("nan")])),
])
def test_malformed_output_is_a_failure_not_an_exception(tokens, token_set) -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    out = score_reconstruction(Reconstruction(None, None, tokens=tokens, token_set=token_set), text_truth(truth))
    assert "failed" in out and out["batch_size"] == 2 and not any(k.startswith("rouge") for k in out)


def test_dispatch_and_kind_mismatches() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    out = score_reconstruction(Reconstruction(None, None, tokens=truth.flip(0)), text_truth(truth))
    assert out["exact_seq_rate"] == 1.0 and out["order"] == [1, 0] and out["rougeL_mean"] == 1.0
    images = GroundTruth(0, 0, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert "failed" in score_reconstruction(Reconstruction(None, None, tokens=truth), images)
    assert "failed" in score_reconstruction(Reconstruction(torch.rand(2, 3, 8, 8), None), text_truth(truth))
    assert score_reconstruction(Reconstruction.failure("boom"), text_truth(truth))["failed"] == "boom"
    assert "failed" in score_reconstruction(Reconstruction(None, None), text_truth(truth))


def test_classifier_labels_are_scored_under_the_sequence_matching() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    rec = Reconstruction(None, torch.tensor([1, 0]), tokens=truth.flip(0))  # sequences swapped, labels with them
    out = score_reconstruction(rec, text_truth(truth, torch.tensor([0, 1])))
    assert out["label_acc"] == 1.0 and out["label_acc_matched"] == 1.0
    lm = score_reconstruction(Reconstruction(None, None, tokens=truth), text_truth(truth))  # LM: labels = tokens
    assert "label_acc" not in lm and "label_error" not in lm


def test_directions_and_trivial_attackers() -> None:
    for name in ("rouge1", "rouge2", "rougeL", "exact_seq_rate", "token_precision", "token_recall",
                 "token_set_precision", "token_set_recall"):
        assert TEXT_METRIC_DIRECTIONS[name] == METRIC_DIRECTIONS[name] == "higher leaks more"
    public = torch.tensor([[7, 7, 7, 2], [2, 5, 7, 1]])
    assert trivial_guesses("most_frequent", 2, 3, public=public).tolist() == [[7, 2, 1], [7, 2, 1]]  # 7 x4, 2 x2
    rows = trivial_guesses("public_rows", 5, 4, public=public, seed=1)
    assert all(r in public.tolist() for r in rows.tolist())
    uniform = trivial_guesses("uniform", 3, 4, vocab_size=10, seed=1)
    assert uniform.shape == (3, 4) and 0 <= int(uniform.min()) and int(uniform.max()) < 10
    with pytest.raises(ValueError):
        trivial_guesses("public_rows", 1, 4)
    # the bag baseline: every sequence guessed as the batch's most frequent ids (5, 6, 3, 4 here: 6 x3, 3 and 5 x2)
    truth = torch.tensor([[3, 3, 4, 5], [5, 6, 6, 6]])
    out = score_text(truth, None, truth)
    guess = [6, 3, 5, 4]
    expected = sum(ngram_f(guess, t, 1) for t in truth.tolist()) / 2
    assert out["bag_baseline_rouge1_mean"] == pytest.approx(expected)


def test_console_line_names_text_metrics_not_psnr() -> None:
    """fedsim run printed 'PSNR nan dB, SSIM nan' for text outcomes; fedsim.cli now prints this line."""
    from fedsim.metrics.text import text_line

    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    line = text_line(score_text(truth[:1], None, truth))
    assert line.startswith("ROUGE-1/2/L 0.50/0.50/0.50") and "exact 1/2" in line and "PSNR" not in line
    assert text_line(score_text(None, torch.tensor([1, 2]), truth)) == "bag P/R 1.00/0.25"


def test_the_matching_cost_agrees_with_rouge_score_and_brute_force() -> None:
    """The vectorised ROUGE-L used to match (fedsim.metrics.text.rouge_l_matrix) against rouge-score on every pair
    and against the brute-force LCS, unfilled ids (-1) included."""
    from fedsim.metrics.text import rouge_l_matrix

    gen = torch.Generator().manual_seed(4)
    rec = torch.randint(-1, 4, (6, 7), generator=gen)
    truth = torch.randint(0, 4, (5, 7), generator=gen)
    matrix = rouge_l_matrix(rec, truth)
    for i in range(6):
        filled = [t for t in rec[i].tolist() if t >= 0]
        for j in range(5):
            assert matrix[i, j] == pytest.approx(rouge_f(rec[i], truth[j])["rougeL"])
            assert matrix[i, j] == pytest.approx(f_measure(brute_lcs(filled, truth[j].tolist()), len(filled), 7))
