"""The shipped data sets, asked for by name (`demo:NAME`): demos, never anyone's default.

Each demo gives its examples in a fixed order with stable uids, its label names, and the
fraction of its fixed held-out split (a hash of each uid: data/sources.py `in_test`), which an
aggregator evaluates on and an agent never trains on.

Adding a demo is one loader function and one `register` call below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from data.records import LabelledText


@dataclass(frozen=True)
class Demo:
    name: str
    about: str
    load: Callable[[], tuple[tuple[LabelledText, ...], tuple[str, ...]]]  # (examples, label names)
    test_fraction: float


DEMOS: dict[str, Demo] = {}


def register(demo: Demo) -> Demo:
    DEMOS[demo.name] = demo
    return demo


@lru_cache(maxsize=1)
def _vader() -> tuple[tuple[LabelledText, ...], tuple[str, ...]]:
    from data.sentiment import LABELS, load_vader

    return tuple(LabelledText(e.text, e.label, LABELS[e.label], e.domain, e.uid) for e in load_vader()), LABELS


@lru_cache(maxsize=1)
def _brown() -> tuple[tuple[LabelledText, ...], tuple[str, ...]]:
    from data.corpus import load_sentences

    sentences = load_sentences()
    genres = tuple(sorted({s.genre for s in sentences}))
    index = {g: i for i, g in enumerate(genres)}
    return tuple(LabelledText(s.text, index[s.genre], s.genre, s.genre, s.uid) for s in sentences), genres


register(Demo("vader", "VADER sentiment snippets, 4 domains (movie, tweets, amazon, nyt), labels negative/positive "
              "(data/vader)", _vader, test_fraction=0.2))
register(Demo("brown", "Brown corpus sentences for language modelling; label = the Brown genre letter a..r "
              "(data/corpus)", _brown, test_fraction=0.05))
