"""ROUGE against values computed by hand."""

from __future__ import annotations

import pytest

from aggregator.rouge import lcs_length, rouge, rouge_l, rouge_n, words


def test_words_are_lowercased_alphanumeric_runs():
    assert words("The cat, the HAT's 2 mats!") == ["the", "cat", "the", "hat", "s", "2", "mats"]


def test_rouge_1_counts_clipped_unigram_overlap():
    # ref: the cat sat on the mat (6 words); hyp: the the the cat (4 words)
    # overlap: "the" min(2, 3) = 2, "cat" 1 -> 3; P = 3/4, R = 3/6, F1 = 2 * .75 * .5 / 1.25 = 0.6
    assert rouge_n("the cat sat on the mat", "the the the cat", 1) == pytest.approx(0.6)


def test_rouge_2_counts_bigrams():
    # ref bigrams: the-cat cat-sat sat-on on-the the-mat (5); hyp: the-cat cat-on on-the the-mat (4)
    # overlap 3 (the-cat, on-the, the-mat): P = 3/4, R = 3/5, F1 = 2 * .75 * .6 / 1.35 = 2/3
    assert rouge_n("the cat sat on the mat", "the cat on the mat", 2) == pytest.approx(2 / 3)


def test_rouge_l_uses_the_longest_common_subsequence():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # LCS("police killed the gunman", "police kill the gunman") = police the gunman = 3
    # P = 3/4, R = 3/4, F1 = 0.75
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # word order matters for L, not for 1: "the gunman kill police" -> LCS 2 (the gunman) -> 0.5
    assert rouge_l("police killed the gunman", "the gunman kill police") == pytest.approx(0.5)
    assert rouge_n("police killed the gunman", "the gunman kill police", 1) == pytest.approx(0.75)


def test_edge_cases_and_means():
    assert rouge_l("", "anything") == 0.0 and rouge_n("text", "", 1) == 0.0
    assert rouge_l("same words here", "Same, words HERE.") == 1.0
    r = rouge(["the cat sat on the mat", "a b"], ["the the the cat", "a b"])
    assert r["rouge1"] == pytest.approx((0.6 + 1.0) / 2)
    # bigrams: hyp the-the, the-the, the-cat; ref has the-cat once -> P = 1/3, R = 1/5, F1 = 0.25
    assert r["rouge2"] == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError, match="as many"):
        rouge(["a"], [])
