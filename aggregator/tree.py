"""A tree of aggregators: replicas fold updates into partial sums, a master combines them exactly.

Each replica takes its share of a round's updates (a shared subscription splits the stream),
checks each one as the single aggregator does (`ensure_checked`), and folds its state into a
`Partial`: float64 sums of weight x state, the sum of weights, and the (agent, round, nonce) of
every update in it. States, not deltas: a replica then spends per update what one aggregator's
FedAvg does (no subtraction per value), and the master subtracts the round's global once from the
mean (mean state - global = mean delta, the weights summing to one). At the deadline a replica
hands its partial to the master, which refuses a partial that repeats an update another one holds
(`DuplicateUpdate`), adds the sums (`combine`: float64, so the order and the split change nothing
beyond rounding) and applies the strategy's server step once on the mean delta (`tree_step`:
FedAvg's global + mean delta, FedAdam/FedYogi's optimiser). The result equals the single
aggregator's to float rounding (tests/test_tree.py).

Strategies whose server step needs the mean of the deltas only (fedavg, fedadam, fedyogi) run in
a tree. Those that need every update at once (median, trimmed_mean, krum), clip's per-update
scaling of the fleet's norm and dp_fedavg's per-update clipping with one noise draw are refused
here (`TreeUnsupported`): with replicas they need the replicas to forward validated updates to
the master, which this module does not do. Pure logic: no broker, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from aggregator.strategies.averaging import WeightedMean
from aggregator.strategies.base import ClientUpdate, StateDict, delta_of, ensure_checked


class TreeUnsupported(ValueError):
    """The strategy needs every update at the master: it cannot run on replicas' partial sums."""


class DuplicateUpdate(ValueError):
    """The same (agent, round, nonce) in two partials, or twice in one: counted once, never twice."""


UpdateId = tuple[str, int, str]  # (agent, round, nonce)


def require_tree(strategy) -> None:
    """Raise TreeUnsupported unless `strategy` can take its step from combined partial sums."""
    if not hasattr(strategy, "step_from_mean"):
        raise TreeUnsupported(
            f"strategy {getattr(strategy, 'name', strategy)!r} needs every update at once and cannot run on "
            "aggregator replicas' partial sums: use fedavg, fedadam or fedyogi with replicas, or one aggregator")


@dataclass
class Partial:
    """One replica's share of a round: float64 sums of weight x state, their weight, the ids."""

    replica: str
    round: int
    mean: WeightedMean = field(default_factory=WeightedMean)
    ids: list[UpdateId] = field(default_factory=list)

    def fold(self, current: Mapping[str, torch.Tensor], update: ClientUpdate, *, weighted: bool = True,
             round_number: int | None = None) -> None:
        """Check the update against the round's global and add its state (weight: its examples, or 1)."""
        key = (update.agent_id, self.round if round_number is None else round_number, update.nonce or "")
        if key in set(self.ids):
            raise DuplicateUpdate(f"update {key} folded twice into replica {self.replica}'s partial")
        ensure_checked(current, update)
        self.mean.add({k: update.tensors[k] for k in current}, float(update.num_examples) if weighted else 1.0)
        self.ids.append(key)

    @property
    def count(self) -> int:
        return self.mean.count


def combine(partials: Iterable[Partial]) -> tuple[WeightedMean, list[UpdateId]]:
    """The master's sum of the replicas' partials, refusing any update counted twice."""
    total, seen = WeightedMean(), {}
    for p in partials:
        for key in p.ids:
            if key in seen:
                raise DuplicateUpdate(f"update {key} is in the partials of replicas {seen[key]} and {p.replica}: "
                                      "each update counts once")
            seen[key] = p.replica
        if p.count:
            total.merge(p.mean)
    return total, list(seen)


def tree_step(strategy, current: Mapping[str, torch.Tensor], partials: Iterable[Partial]) -> StateDict:
    """The new global from the replicas' partials: combine them, then the strategy's server step."""
    require_tree(strategy)
    total, _ = combine(partials)
    if not total.count:
        raise ValueError("no updates in any partial: nothing to aggregate")
    return strategy.step_from_mean(current, delta_of(current, total.result64()))
