"""ROUGE-1, ROUGE-2 and ROUGE-L F1 of generated text against a reference (Lin, 2004), pure Python.

Text is lower-cased and split into words (runs of letters and digits), as rouge-score's
default tokenizer does without stemming. ROUGE-N counts overlapping n-grams (clipped by the
reference's counts); ROUGE-L uses the longest common subsequence of the word lists. Each gives
precision P = overlap / |hypothesis|, recall R = overlap / |reference| and F1 = 2PR / (P + R)
(0 when either side is empty).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    if overlap == 0 or n_hyp == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(reference: str, hypothesis: str, n: int) -> float:
    """F1 of n-gram overlap."""
    ref, hyp = words(reference), words(hypothesis)
    rc = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    hc = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    return _f1(sum((rc & hc).values()), sum(hc.values()), sum(rc.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str) -> float:
    """F1 of the longest common subsequence of words."""
    ref, hyp = words(reference), words(hypothesis)
    return _f1(lcs_length(ref, hyp), len(hyp), len(ref))


def rouge(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over pairs (the corpus score rouge-score's aggregator reports as mid)."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references (got {len(hypotheses)} and {len(references)})")
    n = len(references)
    return {
        "rouge1": sum(rouge_n(r, h, 1) for r, h in zip(references, hypotheses)) / n,
        "rouge2": sum(rouge_n(r, h, 2) for r, h in zip(references, hypotheses)) / n,
        "rougeL": sum(rouge_l(r, h) for r, h in zip(references, hypotheses)) / n,
    }
