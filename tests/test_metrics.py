"""ROUGE protocols against hand-computed values, sentence splitting, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer

from dialogsum.metrics import (
    HEADLINE_PROTOCOL,
    PROTOCOLS,
    ROUGE_KEYS,
    bootstrap_ci,
    compute_rouge,
    eval_set_fingerprint,
    paired_bootstrap,
    rouge_with_intervals,
    score_examples,
    split_sentences,
)

PREDICTION = "the cat sat on the mat"
REF_CLOSE = "a cat sat on a mat"  # 4 of 6 unigrams, 2 of 5 bigrams, LCS 4
REF_FAR = "the dog ran away"  # shares one "the": P = 1/6, R = 1/4


def test_single_pair_matches_hand_computation() -> None:
    scores = score_examples([PREDICTION], [[REF_CLOSE]])
    multi = scores["multi_reference"]
    assert multi["rouge1"] == [pytest.approx(2 / 3)]
    assert multi["rouge2"] == [pytest.approx(2 / 5)]
    assert multi["rougeL"] == [pytest.approx(2 / 3)]
    assert multi["rougeLsum"] == [pytest.approx(2 / 3)]


def test_multi_reference_takes_best_reference_and_mean_averages() -> None:
    scores = score_examples([PREDICTION], [[REF_CLOSE, REF_FAR]])
    far_f1 = 2 * (1 / 6) * (1 / 4) / (1 / 6 + 1 / 4)  # = 0.2
    assert scores["multi_reference"]["rouge1"] == [pytest.approx(2 / 3)]
    assert scores["mean_over_references"]["rouge1"] == [pytest.approx((2 / 3 + far_f1) / 2)]
    assert scores["mean_over_references"]["rouge2"] == [pytest.approx((2 / 5 + 0.0) / 2)]
    assert scores["flat"]["rouge1"] == [pytest.approx(2 / 3), pytest.approx(far_f1)]
    assert scores["flat"]["rougeL"] == [pytest.approx(2 / 3), pytest.approx(far_f1)]


def test_best_reference_is_chosen_per_metric_like_score_multi() -> None:
    prediction = "alpha beta gamma delta"
    ref_a = "delta gamma beta alpha"  # every unigram, no bigram, LCS 1
    ref_b = "alpha beta omega sigma"  # half the unigrams, 1 of 3 bigrams, LCS 2
    multi = score_examples([prediction], [[ref_a, ref_b]])["multi_reference"]
    assert multi["rouge1"] == [pytest.approx(1.0)]
    assert multi["rouge2"] == [pytest.approx(1 / 3)]
    assert multi["rougeL"] == [pytest.approx(0.5)]
    reference = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True).score_multi([ref_a, ref_b], prediction)
    for key in ROUGE_KEYS:
        assert multi[key][0] == pytest.approx(reference[key].fmeasure)


def test_compute_rouge_layout_and_single_reference_protocols_agree() -> None:
    predictions = [PREDICTION, "hello there friend", "nothing in common"]
    references = [[REF_CLOSE], ["hello there my friend"], ["completely different words"]]
    result = compute_rouge(predictions, references)
    assert result["headline_protocol"] == HEADLINE_PROTOCOL == "multi_reference"
    assert result["num_examples"] == 3 and result["num_references"] == 3
    for key in ROUGE_KEYS:
        values = {result[protocol][key] for protocol in PROTOCOLS}
        assert len(values) == 1
        assert result[key] == result["multi_reference"][key]
    assert result["rouge1"] == pytest.approx((2 / 3 + 6 / 7 + 0.0) / 3)


def test_flat_weights_rows_while_mean_weights_dialogues() -> None:
    # Dialogue 1 has three references, dialogue 2 has one: flat gives dialogue 1 three times the weight.
    predictions = ["same words here", "same words here"]
    references = [["same words here", "same words here", "other"], ["other"]]
    result = compute_rouge(predictions, references)
    assert result["num_references"] == 4
    assert result["multi_reference"]["rouge1"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["mean_over_references"]["rouge1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert result["flat"]["rouge1"] == pytest.approx(2 / 4)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_examples(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        score_examples(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        score_examples(["a"], ["a"])  # a bare string is not a list of references
    with pytest.raises(ValueError, match="no predictions"):
        compute_rouge([], [])


def test_split_sentences_for_rouge_lsum() -> None:
    text = "#Person1# asks Mr. Smith for help. #Person2# agrees! Really? Yes.\nA new line"
    assert split_sentences(text) == "#Person1# asks Mr. Smith for help.\n#Person2# agrees!\nReally?\nYes.\nA new line"
    assert split_sentences("J. K. Rowling wrote it. Then she rested.") == "J. K. Rowling wrote it.\nThen she rested."
    assert split_sentences("   ") == ""
    # Sentence order matters to rougeLsum only through the split: a swapped pair of sentences keeps full Lsum.
    scores = score_examples(["He left. She came."], [["She came. He left."]])["multi_reference"]
    assert scores["rougeLsum"] == [pytest.approx(1.0)]
    assert scores["rougeL"][0] < 1.0


def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    rng = np.random.default_rng(123)
    scores = rng.beta(2, 5, size=301).tolist()
    low, high = bootstrap_ci(scores, n_resamples=500, seed=7)
    assert low < float(np.mean(scores)) < high
    assert (low, high) == bootstrap_ci(scores, n_resamples=500, seed=7)
    assert (low, high) != bootstrap_ci(scores, n_resamples=500, seed=8)
    wide_low, wide_high = bootstrap_ci(scores, n_resamples=500, seed=7, confidence=0.99)
    assert wide_low <= low and wide_high >= high
    # Standard error of a mean of 301 Beta(2, 5) draws is ~0.009: a 95% interval is ~0.035 wide.
    assert 0.02 < high - low < 0.05


def test_bootstrap_ci_degenerate_and_bad_args() -> None:
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0.1], confidence=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([0.1], n_resamples=0)


def test_paired_bootstrap_detects_a_real_gap_and_not_a_null_one() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=200)
    better = base + 0.05 + rng.normal(0.0, 0.02, size=200)
    result = paired_bootstrap(better.tolist(), base.tolist(), n_resamples=1000, seed=0)
    assert result["mean_difference"] == pytest.approx(float(np.mean(better - base)))
    assert result["ci_low"] < result["mean_difference"] < result["ci_high"]
    assert result["ci_low"] > 0 and result["p_value"] == 0.0
    assert result["n"] == 200 and result["n_resamples"] == 1000 and result["seed"] == 0
    assert result == paired_bootstrap(better.tolist(), base.tolist(), n_resamples=1000, seed=0)

    reverse = paired_bootstrap(base.tolist(), better.tolist(), n_resamples=1000, seed=0)
    assert reverse["mean_difference"] == pytest.approx(-result["mean_difference"])
    assert reverse["p_value"] == 1.0

    noise = base + rng.normal(0.0, 0.05, size=200)
    null = paired_bootstrap(noise.tolist(), base.tolist(), n_resamples=1000, seed=0)
    assert null["ci_low"] < 0 < null["ci_high"]
    assert 0.05 < null["p_value_two_sided"] <= 1.0

    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([0.1, 0.2], [0.1])


def test_rouge_with_intervals() -> None:
    per_example = score_examples(
        [PREDICTION, "hello there friend", "nothing"], [[REF_CLOSE], ["hello there friend"], ["else"]]
    )["multi_reference"]
    result = rouge_with_intervals(per_example, n_resamples=200, seed=1)
    assert set(result) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        entry = result[key]
        assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    assert result["rouge1"]["mean"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_eval_set_fingerprint_changes_with_what_is_scored_only() -> None:
    dialogues, references = ["d one", "d two"], [["r1", "r2", "r3"], ["s1"]]
    base = eval_set_fingerprint(dialogues, references)
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 16
    # order of examples and of references, and surrounding spaces, do not change a score: same fingerprint
    assert eval_set_fingerprint(dialogues[::-1], references[::-1]) == base
    assert eval_set_fingerprint([" d one\n", "d two"], [["r3", "r1", "r2"], ["s1 "]]) == base
    # one reference instead of three, another reference text, another dialogue: another set
    assert eval_set_fingerprint(dialogues, [["r1"], ["s1"]]) != base
    assert eval_set_fingerprint(dialogues, [["r1", "r2", "rX"], ["s1"]]) != base
    assert eval_set_fingerprint(["d one", "d three"], references) != base
