"""Weighted averaging: the streaming mean, FedAvg and the mean client delta."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from aggregator.strategies.base import (
    ClientUpdate,
    NoOptions,
    StateDict,
    StrategyBase,
    checked_updates,
    delta_of,
    parse_options,
)
from aggregator.strategies.registry import register

__all__ = ["FedAvg", "WeightedMean", "fedavg", "mean_delta"]


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

    def merge(self, other: "WeightedMean") -> None:
        """Add another mean's sums and weights (a replica's partial, aggregator/tree.py): the same as
        having added its states here, to float64 rounding."""
        if self._sum and other._sum and set(other._sum) != set(self._sum):
            raise ValueError(f"partial sums name different tensors: {sorted(set(self._sum) ^ set(other._sum))[:3]}")
        for k, s in other._sum.items():
            if k in self._sum:
                self._sum[k].add_(s)
            else:
                self._sum[k] = s.clone()
                self._dtypes[k] = other._dtypes[k]
        self.total_weight += other.total_weight
        self.count += other.count

    def result(self) -> StateDict:
        if not self.count:
            raise ValueError("no updates to average")
        return {k: (s / self.total_weight).to(self._dtypes[k]) for k, s in self._sum.items()}

    def result64(self) -> StateDict:
        """The mean in float64 (no cast back)."""
        if not self.count:
            raise ValueError("no updates to average")
        return {k: s / self.total_weight for k, s in self._sum.items()}


# -- pure aggregation functions (Flower aggregate.py style) ----------------------------------


def fedavg(updates: Iterable[ClientUpdate]) -> StateDict:
    """Weighted FedAvg: sum_i n_i * w_i / sum_i n_i (McMahan et al. 2017). Checks nothing."""
    acc = WeightedMean()
    for u in updates:
        acc.add(u.tensors, float(u.num_examples))
    return acc.result()


def mean_delta(current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate], *, weighted: bool = True) -> StateDict:
    """Streaming mean of (tensors - current) over the updates, in float64.

    Weighted by num_examples when `weighted`, else uniform. Checks each update not yet checked."""
    acc = WeightedMean()
    for u in checked_updates(current, updates):
        acc.add(delta_of(current, u.tensors), float(u.num_examples) if weighted else 1.0)
    if not acc.count:
        raise ValueError("no updates to aggregate")
    return acc.result64()


@register
class FedAvg(StrategyBase):
    """Weighted FedAvg of the clients' states (num_examples as weights). Streams."""

    name = "fedavg"

    def __init__(self, **options: Any) -> None:
        parse_options(NoOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        return fedavg(checked_updates(current, updates))

    # a tree of replicas (aggregator/tree.py): they sum the deltas, this takes their mean
    tree_weighted = True

    def step_from_mean(self, current: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> StateDict:
        """The new global from the mean client delta (float64): current + delta."""
        return {k: (c.detach().to(torch.float64) + delta[k]).to(c.dtype) for k, c in current.items()}
