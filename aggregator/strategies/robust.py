"""Robust aggregation: coordinate-wise median and trimmed mean, Krum / multi-Krum.

They need every update at once (the list is materialised) and ignore num_examples by default:
it is reported by the client, and a Byzantine client would simply claim a huge number.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from pydantic import Field

from aggregator.strategies.averaging import WeightedMean
from aggregator.strategies.base import (
    ClientUpdate,
    NoOptions,
    StateDict,
    StrategyBase,
    StrategyOptions,
    ensure_checked,
    parse_options,
)
from aggregator.strategies.registry import register

__all__ = [
    "Krum", "KrumOptions", "Median", "TrimmedMean", "TrimmedMeanOptions", "coordinate_median",
    "coordinate_trimmed_mean", "krum_scores", "krum_select",
]


def _dtypes(states: Sequence[Mapping[str, torch.Tensor]], current: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    ref = current if current else states[0]
    return {k: t.dtype for k, t in ref.items()}


def _materialise(current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> list[ClientUpdate]:
    ups = list(updates)
    if not ups:
        raise ValueError("no updates to aggregate")
    ref = current if current else ups[0].tensors
    for u in ups:
        ensure_checked(ref, u)
    return ups


def _sorted_stack(states: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    # (n, *shape), sorted along the clients' axis
    return torch.stack([s[key].detach().to(torch.float64) for s in states]).sort(dim=0).values


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median in float64; with an even count, the mean of the two middle values.

    Shift-invariant, so the median of the states equals current + the median of the deltas."""
    if not states:
        raise ValueError("no states to take the median of")
    n = len(states)
    out = {}
    for k in states[0]:
        s = _sorted_stack(states, k)
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def coordinate_trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], beta: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(beta * n) smallest and largest values."""
    if not states:
        raise ValueError("no states to average")
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    n = len(states)
    k = int(math.floor(beta * n))
    return {key: _sorted_stack(states, key)[k : n - k].mean(dim=0) for key in states[0]}


def _flatten(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().to(torch.float64).reshape(-1) for k in keys])


def krum_scores(states: Sequence[Mapping[str, torch.Tensor]], f: int) -> list[float]:
    """Krum score of each state: the sum of squared L2 distances to its n - f - 2 nearest others.

    Distances between states equal distances between deltas, so either can be passed."""
    n = len(states)
    closest = n - f - 2
    if f < 0 or closest < 1:
        raise ValueError(f"krum needs n - f - 2 >= 1 (n={n}, f={f})")
    keys = sorted(states[0])
    x = torch.stack([_flatten(s, keys) for s in states])  # (n, d)
    scores = []
    for i in range(n):
        d2 = (x - x[i]).pow(2).sum(dim=1)  # (n,)
        others = torch.cat([d2[:i], d2[i + 1 :]])
        scores.append(float(others.sort().values[:closest].sum()))
    return scores


def krum_select(states: Sequence[Mapping[str, torch.Tensor]], f: int, m: int = 1) -> list[int]:
    """Indices of the m states with the lowest Krum scores (ties: the lower index first)."""
    scores = krum_scores(states, f)
    if not 1 <= m <= len(states):
        raise ValueError(f"m must be in [1, {len(states)}], got {m}")
    return sorted(range(len(states)), key=lambda i: (scores[i], i))[:m]


# -- strategies -------------------------------------------------------------------------------


@register
class Median(StrategyBase):
    """Coordinate-wise median of the clients' states (unweighted; even n: mean of the middle two)."""

    name = "median"

    def __init__(self, **options: Any) -> None:
        parse_options(NoOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        ups = _materialise(current, updates)
        states = [u.tensors for u in ups]
        dtypes = _dtypes(states, current)
        return {k: t.to(dtypes[k]) for k, t in coordinate_median(states).items()}


class TrimmedMeanOptions(StrategyOptions):
    beta: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end, per coordinate")


@register
class TrimmedMean(StrategyBase):
    """Coordinate-wise trimmed mean: drop floor(beta * n) values at each end, average the rest
    (unweighted)."""

    name = "trimmed_mean"

    def __init__(self, **options: Any) -> None:
        self.options: TrimmedMeanOptions = parse_options(TrimmedMeanOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        ups = _materialise(current, updates)
        states = [u.tensors for u in ups]
        dtypes = _dtypes(states, current)
        return {k: t.to(dtypes[k]) for k, t in coordinate_trimmed_mean(states, self.options.beta).items()}


class KrumOptions(StrategyOptions):
    f: int = Field(0, ge=0, description="assumed number of Byzantine clients")
    m: int = Field(1, ge=1, description="how many lowest-score updates to average (1: Krum, >1: multi-Krum)")
    weighted: bool = Field(False, description="weight the selected updates by num_examples (else uniform)")


@register
class Krum(StrategyBase):
    """Krum / multi-Krum (Blanchard et al. 2017).

    score(i) = sum of squared distances from update i to its n - f - 2 nearest others; the m
    updates with the lowest scores are averaged (uniformly unless weighted=True). Needs
    n >= 2f + 3 updates (the paper's n > 2f + 2) and m <= n - f; refuses the round otherwise.
    `last_selected` holds the agent ids chosen in the last round (report(), diagnostics():
    krum_selected), `last_scores` every agent's score."""

    name = "krum"

    def __init__(self, **options: Any) -> None:
        self.options: KrumOptions = parse_options(KrumOptions, self.name, options)
        self.last_selected: list[str] = []
        self.last_scores: dict[str, float] = {}

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        f, m = self.options.f, self.options.m
        ups = _materialise(current, updates)
        n = len(ups)
        if n < 2 * f + 3:
            raise ValueError(f"krum with f={f} needs at least 2f+3 = {2 * f + 3} updates, got {n}")
        if m > n - f:
            raise ValueError(f"krum with f={f}, m={m} needs m <= n - f = {n - f} (n={n} updates)")
        states = [u.tensors for u in ups]
        scores = krum_scores(states, f)
        chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
        self.last_scores = {ups[i].agent_id: scores[i] for i in range(n)}
        self.last_selected = [ups[i].agent_id for i in chosen]
        acc = WeightedMean()
        for i in chosen:
            acc.add(states[i], float(ups[i].num_examples) if self.options.weighted else 1.0)
        return acc.result()

    def report(self) -> dict[str, Any]:
        return {"krum_selected": list(self.last_selected)}

    def diagnostics(self) -> dict[str, Any]:
        return {"krum_selected": list(self.last_selected)}
