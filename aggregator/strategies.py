"""Aggregation strategies: pure functions and small classes over (adapter tensors, examples).

They import neither paho nor prometheus_client. A strategy takes the current global adapter
state and an iterable of client updates and returns the new global state; iterables are
consumed once, so a caller can stream updates (decode one, add it, drop it) and memory stays
flat in the number of agents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    agent_id: str
    tensors: Mapping[str, torch.Tensor]
    num_examples: int
    staleness: int = 0  # rounds between the global it started from and the current one


class Strategy(Protocol):
    name: str

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict: ...


class WeightedMean:
    """Streaming weighted mean: add() one state at a time, result() at the end.

    Accumulates in float64 so that the order of arrival does not change the result beyond
    rounding of the final cast; memory is one copy of the state whatever the number of adds.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sum and set(tensors) != set(self._sum):
            missing = set(self._sum) ^ set(tensors)
            raise ValueError(f"update tensors differ from the others: {sorted(missing)[:3]}")
        for k, t in tensors.items():
            t64 = t.detach().to(torch.float64)
            if k in self._sum:
                self._sum[k].add_(t64, alpha=weight)
            else:
                self._sum[k] = t64.mul(weight)
                self._dtypes[k] = t.dtype
        self.total_weight += weight
        self.count += 1

    def result(self) -> StateDict:
        if not self.count:
            raise ValueError("no updates to average")
        return {k: (s / self.total_weight).to(self._dtypes[k]) for k, s in self._sum.items()}


def fedavg(updates: Iterable[ClientUpdate]) -> StateDict:
    """Weighted FedAvg: sum_i n_i * w_i / sum_i n_i (McMahan et al. 2017)."""
    acc = WeightedMean()
    for u in updates:
        acc.add(u.tensors, float(u.num_examples))
    return acc.result()


class FedAvg:
    name = "fedavg"

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        return fedavg(updates)


STRATEGIES: dict[str, type] = {"fedavg": FedAvg}


def make_strategy(name: str, **options) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(**options)
