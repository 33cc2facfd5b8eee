"""Leakage metrics of a text reconstruction: ROUGE-1/2/L, exact sequences and token precision/recall.

Text attacks return token ids (:class:`fedsim.threat.Reconstruction`): ``tokens`` (K, T) int64, -1 where a
position was left unfilled, and/or ``token_set`` (M,) the distinct ids found used (bag-only attacks). The truth
is the client's token ids (B, T) (:class:`fedsim.threat.GroundTruth` ``inputs``). The rules are the image
rules of :mod:`fedsim.metrics.leakage`, so text numbers are never flattering by construction:

- **Scored on token ids, not strings.** ROUGE (Lin, 2004; Google's ``rouge-score`` package, F-measure) is
  computed on the whitespace-joined ids with a tokenizer that only splits on spaces (no lowercasing, stemming
  or punctuation stripping): every id is one ROUGE token, and a recovered token counts only if it is the very
  id the client typed. Detokenized strings (``fedsim.text.tokenizer.decode``) are for people to read (the
  report); word-level ROUGE on them would merge and drop subword pieces and punctuation. Unfilled positions
  (-1) are dropped before scoring (they are no token).
- **One-to-one matching.** Recovered sequences are paired with the true ones by an optimal assignment
  (Hungarian, :func:`fedsim.metrics.matching.assign`) on the cost ``1 - ROUGE-L F``, exact (identical)
  pairs first, so a pairing never breaks an exact recovery.
- **Missing = blind guess.** A true sequence without a reconstruction is scored against the empty sequence
  (ROUGE 0, not exact) and enters every mean; ``*_best`` (the worst case for the client) comes from matched
  pairs only and is absent when no sequence came back. An empty (0, T) ``tokens`` is a measured "nothing
  recovered", not a failure.
- **Surplus = oracle selection, paid for.** More sequences than the batch make the matching a selection by the
  ground truth: ``oracle_selection: true``, ``surplus_sequences``; each surplus sequence enters every
  ``*_mean`` as one blind guess, and ``exact_seq_rate`` is divided by B + surplus; the unpenalised values stay
  as ``*_selected``.
- **Tokens, order-free.** ``token_precision`` / ``token_recall``: multiset overlap of ALL recovered tokens
  (every returned sequence, no matching, so no oracle) with all true tokens, pooled over the batch, over the
  recovered resp. true token count. ``token_set_precision`` / ``token_set_recall``: the same on distinct ids
  (``token_set`` when the attack gives one, else the distinct ids of ``tokens``), the score of bag-only attacks.
- **A trivial attacker beside it** (``bag_baseline_*``): every sequence guessed as the batch's own T most frequent
  tokens, most frequent first, ties by id (ground-truth statistics, like the batch mean colour for images: what an
  attacker who knew the bag of tokens and their counts, but no order, scores; at batch 1 with distinct tokens its
  ROUGE-1 is 1, so ROUGE-2/L and exact sequences are what show recovered order). :func:`trivial_guesses` builds the
  other trivial attackers tests and reports compare with (uniform random ids, rows of a public corpus, its most
  frequent tokens).
- **A trivial attacker that never saw the update** (``public_bag_baseline_token_set_precision/recall``, when the
  dataset has a public corpus: :func:`fedsim.data.text.public_sequences`): the bag guessed as the public corpus's
  M most frequent ids (:func:`public_ranking`), M = the number of distinct true ids (generous: it is told the bag's
  size), scored like a token set. Bag P/R of an attack mean something only above it (on KJV at T 16 it is already
  ~0.33 at batch 4).
- Malformed output (not an integer (K, T) tensor, ids below -1, another T) yields ``{"failed": reason}``; this
  module never raises on attack output.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedsim.data.text import has_public_part, public_sequences
from fedsim.metrics.matching import assign
from fedsim.scenario import DataSpec

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

Score = dict[str, Any]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
UNFILLED = -1  # token id of a position the attack left unfilled (fedsim.threat.Reconstruction.tokens)

TEXT_METRIC_DIRECTIONS: dict[str, str] = {
    "rouge1": "higher leaks more",  # ROUGE-1 F-measure on token ids, per true sequence (``_mean``, ``_best``)
    "rouge2": "higher leaks more",
    "rougeL": "higher leaks more",
    "exact_seq_rate": "higher leaks more",  # share of the true sequences recovered identically
    "token_precision": "higher leaks more",  # multiset, pooled over the batch
    "token_recall": "higher leaks more",
    "token_set_precision": "higher leaks more",  # distinct ids
    "token_set_recall": "higher leaks more",
}
"""How to read each text metric (merged into :data:`fedsim.metrics.leakage.METRIC_DIRECTIONS`)."""


class _IdTokenizer:
    """``rouge-score`` tokenizer for whitespace-joined token ids: one id per token, nothing normalised."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.cache
def _scorer() -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer  # imported on first use: it pulls nltk (about a second)

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=_IdTokenizer())


def id_string(ids: Sequence[int] | Tensor | np.ndarray) -> str:
    """Token ids as the string ROUGE scores: the filled ids (>= 0) joined by single spaces."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return " ".join(str(int(i)) for i in values if int(i) >= 0)


def rouge_f(recovered: Sequence[int] | Tensor, truth: Sequence[int] | Tensor) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one recovered id sequence against one true one (-1 dropped)."""
    scores = _scorer().score(id_string(truth), id_string(recovered))  # score(target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def rouge_l_matrix(recovered: Tensor, truth: Tensor) -> np.ndarray:
    """ROUGE-L F-measure of every recovered (K, T') against every true (B, T) sequence, (K, B): ``2 LCS / (m + n)``
    with m the recovered sequence's filled (>= 0) ids and n = T (0 when nothing is shared), the LCS of all pairs at
    once by the textbook dynamic programme on numpy arrays (the matching cost; at K = B = 128 calling rouge-score for
    each pair took 14 s, this takes well under one). Reported values come from rouge-score (:func:`rouge_f`)."""
    r, t = recovered.numpy(), truth.numpy()
    (k, m), (b, n) = r.shape, t.shape
    prev = np.zeros((k, b, n + 1), dtype=np.int64)
    for i in range(m):
        same = (r[:, i, None, None] == t[None, :, :]) & (r[:, i, None, None] >= 0)  # (K, B, n)
        cur = np.zeros_like(prev)
        for j in range(n):
            cur[:, :, j + 1] = np.where(same[:, :, j], prev[:, :, j] + 1, np.maximum(prev[:, :, j + 1], cur[:, :, j]))
        prev = cur
    lcs = prev[:, :, n].astype(np.float64)
    lengths = (r >= 0).sum(axis=1)[:, None] + n
    return np.divide(2.0 * lcs, lengths, out=np.zeros_like(lcs), where=lengths > 0)


def _multiset_pr(recovered: Sequence[int], truth: Sequence[int]) -> tuple[float, float]:
    """(precision, recall) of the multiset overlap ``sum_c min(#rec == c, #true == c)``; 0 over an empty side."""
    rec, tru = Counter(recovered), Counter(truth)
    overlap = sum(min(n, rec[c]) for c, n in tru.items())
    n_rec, n_true = sum(rec.values()), sum(tru.values())
    return (overlap / n_rec if n_rec else 0.0), (overlap / n_true if n_true else 0.0)


def token_set_pr(recovered: Sequence[int] | Tensor, truth: Tensor) -> dict[str, float | int]:
    """``token_set_precision`` = |R & S| / |R| (0 when R is empty), ``token_set_recall`` = |R & S| / |S|, with R
    the distinct recovered ids (>= 0) and S the distinct true ids; ``num_token_set`` = |R|."""
    values = recovered.tolist() if hasattr(recovered, "tolist") else list(recovered)
    rec = {int(i) for i in values if int(i) >= 0}
    tru = {int(i) for i in truth.flatten().tolist()}
    hit = len(rec & tru)
    return {"token_set_precision": hit / len(rec) if rec else 0.0, "token_set_recall": hit / len(tru) if tru else 0.0,
            "num_token_set": len(rec)}


def _int_problem(value: Any, what: str, ndim: int) -> str | None:
    if not isinstance(value, Tensor) or value.ndim != ndim:
        want = "(K, T)" if ndim == 2 else "(M,)"
        return f"{what} is not a {want} tensor (shape {tuple(getattr(value, 'shape', ()))})"
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        return f"{what} are not integer token ids (dtype {value.dtype})"
    if value.numel() and int(value.min()) < UNFILLED:
        return f"{what} contain ids below {UNFILLED} (min {int(value.min())})"
    return None


def _sequence_metrics(recovered: Tensor, truth: Tensor) -> Score:
    """ROUGE means/bests, exact sequences, token P/R and the matching of ``recovered`` (K, T) to ``truth`` (B, T)."""
    b, k = int(truth.shape[0]), int(recovered.shape[0])
    exact = (recovered[:, None, :] == truth[None, :, :]).all(dim=-1).numpy() if k and b else np.zeros((k, b), bool)
    order = assign(1.0 - rouge_l_matrix(recovered, truth), prefer=exact)
    hit = order >= 0
    blind = rouge_f([], truth[0].tolist()) if b else dict.fromkeys(ROUGE_TYPES, 0.0)  # the empty guess: 0
    per = np.array([[blind[name] for name in ROUGE_TYPES]] * b).reshape(b, len(ROUGE_TYPES))
    for i in np.nonzero(hit)[0]:
        scores = rouge_f(recovered[order[i]], truth[i])
        per[i] = [scores[name] for name in ROUGE_TYPES]
    out: Score = {}
    for j, name in enumerate(ROUGE_TYPES):
        out[f"{name}_mean"] = float(per[:, j].mean()) if b else 0.0
        if bool(hit.any()):
            out[f"{name}_best"] = float(per[hit, j].max())
    exact_hits = int(sum(bool(exact[order[i], i]) for i in range(b) if order[i] >= 0))
    out.update(num_exact_seq=exact_hits, exact_seq_rate=exact_hits / b if b else 0.0)
    precision, recall = _multiset_pr([int(i) for i in recovered.flatten().tolist() if i >= 0],
                                     [int(i) for i in truth.flatten().tolist()])
    out.update(token_precision=precision, token_recall=recall)
    out["rougeL_per_seq"] = [float(v) for v in per[:, ROUGE_TYPES.index("rougeL")]]
    surplus = k - b
    if surplus > 0:
        out.update(oracle_selection=True, surplus_sequences=surplus)
        for name in ROUGE_TYPES:
            out[f"{name}_mean_selected"] = out[f"{name}_mean"]
            out[f"{name}_mean"] = (b * out[f"{name}_mean"] + surplus * blind[name]) / (b + surplus)
        out["exact_seq_rate_selected"] = out["exact_seq_rate"]
        out["exact_seq_rate"] = exact_hits / (b + surplus)
    out.update(order=[int(i) for i in order], matched_by="1 - rougeL F (exact pairs first)", num_reconstructed=k)
    return out


def most_frequent_sequence(ids: Tensor, length: int) -> Tensor:
    """The ``length`` most frequent ids of ``ids`` (any shape), most frequent first (ties: smaller id first),
    repeated cyclically when fewer distinct ids exist: one (length,) int64 guess."""
    counts = Counter(int(i) for i in ids.flatten().tolist())
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    if not ranked:
        return torch.full((length,), UNFILLED, dtype=torch.int64)
    return torch.tensor([ranked[i % len(ranked)] for i in range(length)], dtype=torch.int64)


def trivial_guesses(kind: Literal["uniform", "public_rows", "most_frequent"], count: int, length: int, *,
                    vocab_size: int = 0, public: Tensor | None = None, seed: int = 0) -> Tensor:
    """``count`` guesses (count, length) of a trivial attacker who never saw the update.

    ``uniform``: ids drawn uniformly from ``0..vocab_size-1``; ``public_rows``: random rows of ``public``
    (M, length), e.g. :func:`fedsim.data.text.public_sequences`; ``most_frequent``: every guess the ``length``
    most frequent ids of ``public``. Raises ``ValueError`` when the needed input is missing.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        if vocab_size < 1:
            raise ValueError("uniform guesses need vocab_size >= 1")
        return torch.randint(0, vocab_size, (count, length), generator=gen)
    if public is None or public.ndim != 2 or len(public) == 0:
        raise ValueError(f"{kind} guesses need a non-empty (M, T) public corpus")
    if kind == "public_rows":
        rows = torch.randint(0, len(public), (count,), generator=gen)
        return public[rows, :length].long()
    if kind == "most_frequent":
        return most_frequent_sequence(public, length).expand(count, length).clone()
    raise ValueError(f"unknown trivial attacker {kind!r} (uniform, public_rows, most_frequent)")


def public_ranking(public: Tensor) -> list[int]:
    """The distinct ids of a public corpus ``public`` (M, T) (any shape), most frequent first, ties: smaller id
    first: the guesses of :func:`public_bag_baseline`, computed once per corpus."""
    counts = Counter(int(i) for i in public.flatten().tolist() if int(i) >= 0)
    return sorted(counts, key=lambda c: (-counts[c], c))


_PUBLIC_RANKINGS: dict[tuple[str, int], tuple[int, ...] | None] = {}


def dataset_public_ranking(spec: DataSpec, seq_len: int) -> tuple[int, ...] | None:
    """:func:`public_ranking` of ``spec``'s public corpus at ``seq_len`` tokens (:func:`fedsim.data.text.
    public_sequences`), cached per (data spec, T); None when the dataset has no public corpus (then no public-bag
    baseline is scored)."""
    key = (spec.model_dump_json(), int(seq_len))
    if key not in _PUBLIC_RANKINGS:
        found = has_public_part(spec.dataset)
        _PUBLIC_RANKINGS[key] = tuple(public_ranking(public_sequences(spec, int(seq_len)))) if found else None
    return _PUBLIC_RANKINGS[key]


def public_bag_baseline(ranking: Sequence[int], truth: Tensor) -> Score:
    """``public_bag_baseline_token_set_precision/recall``: :func:`token_set_pr` of the first M ids of ``ranking``
    (:func:`public_ranking` of a public corpus; M = the number of distinct ids in ``truth`` (B, T)). It reads
    nothing of the update, only the truth's bag SIZE (which makes it a generous baseline)."""
    size = len({int(i) for i in truth.flatten().tolist()})
    scores = token_set_pr(list(ranking[:size]), truth)
    return {"public_bag_baseline_token_set_precision": scores["token_set_precision"],
            "public_bag_baseline_token_set_recall": scores["token_set_recall"]}


def _baseline(truth: Tensor) -> Score:
    """``bag_baseline_rouge{1,2,L}_mean``, ``bag_baseline_token_precision/recall``: every true sequence guessed as the
    batch's T most frequent ids (:func:`most_frequent_sequence`), scored like a reconstruction."""
    b, t = truth.shape
    scores = _sequence_metrics(most_frequent_sequence(truth, t).expand(b, t).clone(), truth)
    return {f"bag_baseline_{k}": scores[k] for k in (*[f"{n}_mean" for n in ROUGE_TYPES], "token_precision",
                                                  "token_recall")}


def score_text(tokens: Tensor | None, token_set: Tensor | None, truth: Tensor,
               public: Sequence[int] | None = None) -> Score:
    """Text leakage metrics of recovered ``tokens`` (K, T) and/or ``token_set`` (M,) against ``truth`` (B, T) ids.

    Keys (rules in the module docstring): ``batch_size``; with ``tokens``: ``rouge1/rouge2/rougeL`` ``_mean``
    (every true sequence, missing ones as the blind guess) and ``_best`` (matched pairs only), ``num_exact_seq``,
    ``exact_seq_rate``, ``token_precision``, ``token_recall``, ``rougeL_per_seq`` (truth order), ``order`` (per true
    sequence its matched recovered index, -1: none), ``matched_by``, ``num_reconstructed`` (K), with surplus
    ``oracle_selection``, ``surplus_sequences`` and ``*_selected``; always ``token_set_precision``,
    ``token_set_recall``, ``num_token_set`` and the ``bag_baseline_*`` trivial attacker; with ``public`` (a public
    corpus's :func:`public_ranking`) the update-free ``public_bag_baseline_*`` beside them. Malformed input gives
    ``{"failed": reason, "batch_size": B}``; never raises.
    """
    b = int(truth.shape[0]) if isinstance(truth, Tensor) and truth.ndim >= 1 else 0
    out: Score = {"batch_size": b}
    try:
        if not isinstance(truth, Tensor) or truth.ndim != 2 or truth.is_floating_point():
            return {"failed": "the client's data are not token sequences: cannot score recovered tokens", **out}
        truth = truth.detach().cpu().long()
        if tokens is None and token_set is None:
            return {"failed": "the attack returned no tokens", **out}
        if tokens is not None:
            problem = _int_problem(tokens, "recovered tokens", 2)
            if problem is None and tokens.shape[1] != truth.shape[1]:
                problem = f"recovered sequences have {tokens.shape[1]} tokens, the data {truth.shape[1]}"
            if problem:
                return {"failed": problem, **out}
            tokens = tokens.detach().cpu().long()
            out.update(_sequence_metrics(tokens, truth))
        if token_set is not None:
            problem = _int_problem(token_set, "the recovered token set", 1)
            if problem:
                if tokens is None:
                    return {"failed": problem, **out}
                out["token_set_error"] = problem
                token_set = None
        bag = token_set if token_set is not None else tokens
        out.update(token_set_pr(bag.detach().cpu().flatten(), truth))
        if b:
            out.update(_baseline(truth))
            if public:
                out.update(public_bag_baseline(public, truth))
    except Exception as exc:  # noqa: BLE001 - scoring must not take the run down with it
        return {"failed": f"scoring error: {type(exc).__name__}: {exc}", "batch_size": b}
    return out


def text_line(metrics: Score) -> str:
    """One line of a text outcome's metrics for the console: ROUGE-1/2/L and exact sequences (with the bag
    baseline's ROUGE-L beside them) when sequences came back, and the token set's precision/recall (with the
    public-bag baseline's beside them when scored)."""
    bag = f"bag P/R {metrics.get('token_set_precision', 0.0):.2f}/{metrics.get('token_set_recall', 0.0):.2f}"
    if isinstance(metrics.get("public_bag_baseline_token_set_precision"), int | float):  # never saw the update
        bag += (f" (public-bag baseline {metrics['public_bag_baseline_token_set_precision']:.2f}/"
                f"{metrics['public_bag_baseline_token_set_recall']:.2f})")
    if "rougeL_mean" not in metrics:
        return bag
    oracle = " of the selected" if metrics.get("oracle_selection") else ""
    return (f"ROUGE-1/2/L {metrics['rouge1_mean']:.2f}/{metrics['rouge2_mean']:.2f}/{metrics['rougeL_mean']:.2f} "
            f"(bag baseline ROUGE-L {metrics.get('bag_baseline_rougeL_mean', float('nan')):.2f}), "
            f"exact {metrics.get('num_exact_seq', 0)}/{metrics.get('batch_size', 0)}{oracle}, "
            f"token recall {metrics.get('token_recall', 0.0):.2f}, {bag}")
