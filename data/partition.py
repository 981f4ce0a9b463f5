"""Partitioners: which training examples each agent holds.

Each returns `k` lists of indices into the examples; every index appears in exactly one list,
and the same seed gives the same partition on every process.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "by-domain")


def iid(n: int, k: int, seed: int = 0) -> list[list[int]]:
    if k < 1:
        raise ValueError("number of partitions must be at least 1")
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(p.tolist()) for p in np.array_split(perm, k)]


def dirichlet(labels: Sequence[int], k: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Label skew: for each class, split its examples across agents by Dirichlet(alpha) shares."""
    if alpha <= 0:
        raise ValueError("dirichlet alpha must be positive")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet([alpha] * k)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for a, chunk in enumerate(np.split(idx, cuts)):
            parts[a].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def by_domain(domains: Sequence[str], k: int, seed: int = 0) -> list[list[int]]:
    """One domain per agent (the natural non-IID case). With more agents than domains, a
    domain's examples are split iid among the agents that hold it (agent a holds domain a mod D);
    with fewer, agent a holds every domain d with d mod k == a."""
    names = sorted(set(domains), key=list(dict.fromkeys(domains)).index)  # first-seen order
    d_of = {d: i for i, d in enumerate(names)}
    D = len(names)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    by_d: dict[int, list[int]] = {i: [] for i in range(D)}
    for i, d in enumerate(domains):
        by_d[d_of[d]].append(i)
    for di, idx in by_d.items():
        holders = [a for a in range(k) if a % D == di] if k >= D else [di % k]
        arr = rng.permutation(np.asarray(idx, dtype=int))
        for a, chunk in zip(holders, np.array_split(arr, len(holders))):
            parts[a].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def partition(name: str, *, labels: Sequence[int], domains: Sequence[str], k: int,
              seed: int = 0, alpha: float = 0.5) -> list[list[int]]:
    if name == "iid":
        return iid(len(labels), k, seed)
    if name == "dirichlet":
        return dirichlet(labels, k, alpha, seed)
    if name in ("by-domain", "by_domain", "domain"):
        return by_domain(domains, k, seed)
    raise ValueError(f"unknown partition {name!r}; choose one of {', '.join(PARTITIONERS)}")
