"""A second, multi-class task from shipped text: the Brown corpus genre of a sentence.

The sentences are data/corpus (Brown, MIT, see its README); the label is the genre of the file a
sentence comes from (the corpus' categories a..r). Nothing here is a demo the agents train on
by default: it writes ordinary data files, one per agent, in the formats a user's devices would
hold, so a run on them is a run on "your own data".

    python -m data.genres write OUT --genres a,j,n --per-class 400 --agents 3
    # OUT/agent-1.csv, OUT/agent-2.jsonl, OUT/agent-3.parquet (text,label,id); OUT/labels.txt

`--skew S` gives agent i a share S of its rows from the i-th genre (label skew; 0: an even
random split).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Sequence

import typer

from common.cli import new_app
from data.records import LabelledText

GENRES = {
    "a": "press_reportage", "b": "press_editorial", "c": "press_reviews", "d": "religion", "e": "skills_hobbies",
    "f": "popular_lore", "g": "belles_lettres", "h": "government", "j": "learned", "k": "fiction",
    "l": "mystery", "m": "science_fiction", "n": "adventure", "p": "romance", "r": "humor",
}
FORMATS = ("csv", "jsonl", "parquet")


def genre_examples(genres: Sequence[str] = ("a", "j", "n"), per_class: int = 400, min_chars: int = 40,
                   seed: int = 0) -> list[LabelledText]:
    """`per_class` sentences of each genre (at least `min_chars` long), shuffled; labels are the
    genre names in sorted order (LabelledText.label indexes that list)."""
    from data.corpus import load_sentences

    unknown = [g for g in genres if g not in GENRES]
    if unknown:
        raise ValueError(f"unknown Brown genre {unknown[0]!r}: choose from {', '.join(GENRES)}")
    names = label_names(genres)
    rng = random.Random(seed)
    pools: dict[str, list] = {g: [] for g in genres}
    for s in load_sentences():
        if s.genre in pools and len(s.text) >= min_chars:
            pools[s.genre].append(s)
    out = []
    for g in genres:
        if len(pools[g]) < per_class:
            raise ValueError(f"genre {g} has {len(pools[g])} sentences of {min_chars}+ characters, fewer than {per_class}")
        for s in rng.sample(pools[g], per_class):
            out.append(LabelledText(s.text, names.index(GENRES[g]), GENRES[g], GENRES[g], s.uid))
    rng.shuffle(out)
    return out


def label_names(genres: Sequence[str]) -> list[str]:
    return sorted(GENRES[g] for g in genres)


def split_agents(examples: Sequence[LabelledText], agents: int, skew: float = 0.0, seed: int = 0) -> list[list]:
    """`agents` disjoint shares: agent i takes a share `skew` of its rows from label i (mod the labels)
    and the rest at random; 0: an even random split."""
    rng = random.Random(seed + 1)
    rest = list(examples)
    rng.shuffle(rest)
    size = len(rest) // agents
    shares: list[list] = [[] for _ in range(agents)]
    if skew > 0:
        labels = sorted({e.label for e in rest})
        for i in range(agents):
            want = labels[i % len(labels)]
            own = [e for e in rest if e.label == want][: int(size * skew)]
            taken = {id(e) for e in own}
            shares[i].extend(own)
            rest = [e for e in rest if id(e) not in taken]
    for i in range(agents):
        need = size - len(shares[i])
        shares[i].extend(rest[:need])
        rest = rest[need:]
        rng.shuffle(shares[i])
    return shares


def write_rows(path: Path, rows: Sequence[LabelledText]) -> Path:
    """A data file in the format its suffix names (.csv, .jsonl, .parquet): columns text, label, id."""
    records = [{"text": e.text, "label": e.label_name, "id": e.uid} for e in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "id"])
            w.writeheader()
            w.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"{path}: write .csv, .jsonl or .parquet")
    return path


def write_agent_files(out: Path, genres: Sequence[str] = ("a", "j", "n"), per_class: int = 400, agents: int = 3,
                      skew: float = 0.0, seed: int = 0) -> list[Path]:
    """OUT/agent-<i>.<csv|jsonl|parquet> (the formats in turn) and OUT/labels.txt."""
    shares = split_agents(genre_examples(genres, per_class, seed=seed), agents, skew, seed)
    out = Path(out)
    paths = [write_rows(out / f"agent-{i + 1}.{FORMATS[i % len(FORMATS)]}", rows) for i, rows in enumerate(shares)]
    (out / "labels.txt").write_text(",".join(label_names(genres)) + "\n")
    return paths


app = new_app("The Brown corpus genre task: data files for a run on your own data.")


@app.command()
def write(out: Path, genres: str = typer.Option("a,j,n", help="Brown genre letters, comma-separated"),
          per_class: int = typer.Option(400, min=1), agents: int = typer.Option(3, min=1),
          skew: float = typer.Option(0.0, min=0.0, max=1.0), seed: int = typer.Option(0)) -> None:
    """Write one data file per agent of the Brown genre task."""
    paths = write_agent_files(out, [g.strip() for g in genres.split(",") if g.strip()], per_class, agents, skew, seed)
    typer.echo("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    app()
