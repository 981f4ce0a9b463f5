"""The VADER sentiment snippets (four domains) with a fixed held-out test split.

Every process of a run derives the same splits from the shipped files: the test split is a
hash of each snippet's (domain, id), so it does not depend on a seed or on file order, and no
agent ever trains on it.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

VADER_DIR = Path(__file__).resolve().parent / "vader"
DOMAIN_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt.gz",
    "tweets": "tweets_GroundTruth.txt.gz",
    "amazon": "amazonReviewSnippets_GroundTruth.txt.gz",
    "nyt": "nytEditorialSnippets_GroundTruth.txt.gz",
}
DOMAINS = tuple(DOMAIN_FILES)
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    domain: str
    uid: str  # "<domain>:<id>"


def _is_test(uid: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


@lru_cache(maxsize=4)
def load_vader(min_abs_score: float = 0.5, root: str | None = None) -> tuple[Example, ...]:
    """All snippets with |score| >= min_abs_score, labelled score > 0, in file order."""
    base = Path(root) if root else VADER_DIR
    out: list[Example] = []
    for domain, fname in DOMAIN_FILES.items():
        path = base / fname
        if not path.exists():
            raise FileNotFoundError(f"VADER data file {path} is missing: reinstall edgetune or restore data/vader/")
        with gzip.open(path, "rt", encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t", 2)
                if len(parts) != 3:
                    continue
                sid, score, text = parts
                s = float(score)
                if abs(s) < min_abs_score or not text.strip():
                    continue
                out.append(Example(text.strip(), int(s > 0), domain, f"{domain}:{sid}"))
    return tuple(out)


def train_test_split(
    examples: tuple[Example, ...] | None = None, test_fraction: float = 0.2
) -> tuple[list[Example], list[Example]]:
    examples = examples if examples is not None else load_vader()
    train, test = [], []
    for e in examples:
        (test if _is_test(e.uid, test_fraction) else train).append(e)
    return train, test
