"""ROUGE for dialogue summaries with one or several references, and bootstrap confidence intervals.

Scoring uses Google's ``rouge_score`` package directly (``evaluate.load("rouge")`` needs the hub), with the
Porter stemmer on, as the Hugging Face summarization example does. ``rougeLsum`` treats newlines as sentence
boundaries; nltk's punkt model is not available offline, so :func:`split_sentences` splits summaries into
sentences with a small rule (end punctuation followed by whitespace, common abbreviations kept whole) before
scoring. The splitting only matters for ``rougeLsum``: the ROUGE tokenizer turns newlines into spaces for the
other metrics.

DialogSum's official test file has three human summaries per dialogue (``summary1..3``); the hub version
flattens it into three rows per dialogue. Each unique dialogue is summarised once and scored against all its
references under three protocols, all F1 (``fmeasure``) in 0..1:

* ``multi_reference`` (the **headline**): per dialogue and per metric, the best-matching reference, exactly as
  ``rouge_score``'s ``score_multi`` (and the ``evaluate`` ROUGE metric given lists of references) does. Each
  reference is an equally valid human summary, and a prediction should not be penalised for agreeing with one
  annotator rather than another; best-match is also the standard multi-reference convention, so the figure is
  comparable with other multi-reference results. It is the highest of the three protocols.
* ``mean_over_references``: per dialogue, the mean F1 over its references, then the mean over dialogues
  (every dialogue weighs the same whatever its number of references).
* ``flat``: one score per (prediction, reference) row, averaged over rows. This is the figure obtained by
  scoring the hub's flattened test split row by row (as the reference lab and most public notebooks do), so
  use it to compare with numbers reported that way.

With one reference per dialogue all three protocols give identical numbers.

Confidence intervals are percentile bootstraps over dialogues (:func:`bootstrap_ci`), and two systems scored
on the same dialogues are compared with a paired bootstrap (:func:`paired_bootstrap`). Both are seeded and
use numpy only, so results are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
PROTOCOLS = ("multi_reference", "mean_over_references", "flat")
HEADLINE_PROTOCOL = "multi_reference"

# Words that end with a period without ending a sentence ("Mr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr mt vs etc e.g i.e no approx dept".split())
# A sentence ends at ., ! or ? (maybe repeated, maybe followed by a closing quote/bracket) and whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
# Keep the resampled index matrix of a bootstrap around 16 MB whatever the number of examples.
_BOOTSTRAP_CELLS_PER_CHUNK = 2_000_000


def split_sentences(text: str) -> str:
    """Put each sentence of ``text`` on its own line (the sentence boundaries ``rougeLsum`` uses).

    Existing line breaks are kept as boundaries; a period after a common abbreviation ("Mr.", "Dr.", "e.g.")
    or a single-letter initial does not end a sentence.
    """
    sentences: list[str] = []
    for line in text.strip().splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            words = line[start : match.start()].split()
            last_word = words[-1].lower().rstrip(".") if words else ""
            if line[match.start()] == "." and (last_word in _ABBREVIATIONS or len(last_word) == 1):
                continue
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return "\n".join(s for s in sentences if s)


def make_scorer() -> rouge_scorer.RougeScorer:
    """The ROUGE scorer used everywhere in the project: all four metrics, Porter stemmer on."""
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"example {index}: references must be a non-empty list of strings")


def score_examples(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, dict[str, list[float]]]:
    """Per-example ROUGE F1 under each protocol.

    Args:
        predictions: one generated summary per unique dialogue.
        references: for each dialogue, the list of its human summaries (one or more).

    Returns:
        ``{protocol: {rouge_key: scores}}``. For ``multi_reference`` and ``mean_over_references`` there is one
        score per dialogue; for ``flat`` one score per (dialogue, reference) pair, in input order.
    """
    _check_inputs(predictions, references)
    scorer = make_scorer()
    result: dict[str, dict[str, list[float]]] = {p: {k: [] for k in ROUGE_KEYS} for p in PROTOCOLS}
    for prediction, refs in zip(predictions, references, strict=True):
        prediction_text = split_sentences(prediction)
        # rows[k][j] = F1 of metric k against reference j. Taking the max per metric is score_multi's rule.
        rows = {k: [] for k in ROUGE_KEYS}
        for reference in refs:
            scores = scorer.score(split_sentences(reference), prediction_text)
            for key in ROUGE_KEYS:
                rows[key].append(scores[key].fmeasure)
        for key in ROUGE_KEYS:
            result["multi_reference"][key].append(max(rows[key]))
            result["mean_over_references"][key].append(math.fsum(rows[key]) / len(rows[key]))
            result["flat"][key].extend(rows[key])
    return result


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def compute_rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus ROUGE (mean F1, 0..1) under every protocol; the top-level keys are the headline protocol.

    Returns a dict with ``rouge1, rouge2, rougeL, rougeLsum`` (headline: multi-reference best match), the
    labelled sub-objects ``multi_reference``, ``mean_over_references`` and ``flat`` (each with the four
    keys), ``headline_protocol``, ``num_examples`` (unique dialogues) and ``num_references`` (all references).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    per_example = score_examples(predictions, references)
    result: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        result[protocol] = {key: _mean(per_example[protocol][key]) for key in ROUGE_KEYS}
    result = {**result[HEADLINE_PROTOCOL], **result}
    result["headline_protocol"] = HEADLINE_PROTOCOL
    result["num_examples"] = len(predictions)
    result["num_references"] = sum(len(refs) for refs in references)
    return result


def eval_set_fingerprint(dialogues: Sequence[str], references: Sequence[Sequence[str]]) -> str:
    """A short hash of what a score was computed on: each dialogue with its set of references.

    Independent of example order, ids and reference order (none of them changes a ROUGE score); any change of a
    dialogue, a reference or the number of references changes it. Two results are comparable only when their
    fingerprints are equal.
    """
    items = sorted(json.dumps([d.strip(), sorted(r.strip() for r in refs)]) for d, refs in zip(dialogues, references))
    digest = hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, same size) of ``values``."""
    rng = np.random.default_rng(seed)
    n = len(values)
    chunk = max(1, _BOOTSTRAP_CELLS_PER_CHUNK // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[indices].mean(axis=1)
    return means


def _check_bootstrap_args(n: int, n_resamples: int, confidence: float) -> None:
    if n == 0:
        raise ValueError("cannot bootstrap an empty list of scores")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    scores: Sequence[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling examples with replacement).

    Returns ``(low, high)``; the same ``seed`` always gives the same interval.
    """
    values = np.asarray(scores, dtype=np.float64)
    _check_bootstrap_args(len(values), n_resamples, confidence)
    means = _bootstrap_means(values, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Paired bootstrap test of system A against system B, scored on the same examples in the same order.

    The same resampled examples are used for both systems, so per-dialogue difficulty cancels out.

    Returns a dict with ``mean_difference`` (mean of A minus mean of B), ``ci_low``/``ci_high`` (percentile
    interval of the difference at ``confidence``), ``p_value`` (share of resamples where A - B <= 0: the
    one-sided p-value of "A is better than B"), ``p_value_two_sided``, ``n``, ``n_resamples``, ``seed`` and
    ``confidence``.
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same examples: {len(a)} scores vs {len(b)}")
    _check_bootstrap_args(len(a), n_resamples, confidence)
    means = _bootstrap_means(a - b, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    at_most_zero = float(np.mean(means <= 0.0))
    at_least_zero = float(np.mean(means >= 0.0))
    return {
        "mean_difference": float(np.mean(a - b)),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": at_most_zero,
        "p_value_two_sided": min(1.0, 2.0 * min(at_most_zero, at_least_zero)),
        "n": int(len(a)),
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
    }


def rouge_with_intervals(
    per_example: dict[str, Sequence[float]], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """Mean and bootstrap interval for each metric of one protocol's per-example scores.

    ``per_example`` is one entry of :func:`score_examples` (e.g. ``scores["multi_reference"]``). Returns
    ``{rouge_key: {"mean", "ci_low", "ci_high"}}`` in 0..1.
    """
    result: dict[str, dict[str, float]] = {}
    for key, scores in per_example.items():
        low, high = bootstrap_ci(scores, n_resamples=n_resamples, seed=seed, confidence=confidence)
        result[key] = {"mean": _mean(scores), "ci_low": low, "ci_high": high}
    return result
