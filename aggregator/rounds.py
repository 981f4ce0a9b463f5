"""The round loop as a pure state machine: no broker, no clock of its own, no metrics.

The service feeds it what arrives (with the time) and asks what to do next; tests drive it
directly. One `Round` per announcement.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from typing import Mapping

import torch

from broker.messages import ModelUpdate
from models.adapters import InvalidUpdate, check_adapter_state


class Rejection(Exception):
    """An update that must not count; `reason` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Outcome(enum.Enum):
    collecting = "collecting"
    complete = "complete"  # every selected agent answered
    deadline = "deadline"  # deadline passed with at least the quorum
    failed = "failed"  # deadline passed below the quorum


@dataclass
class Accepted:
    meta: ModelUpdate
    tensors: dict[str, torch.Tensor]
    arrived: float


@dataclass
class Round:
    number: int
    selected: tuple[str, ...]
    deadline: float
    global_version: int
    quorum: int
    expected: Mapping[str, torch.Tensor]  # the global adapter state: names, shapes, dtypes
    accepted: dict[str, Accepted] = field(default_factory=dict)
    target: int = 0  # over-selection: the round is complete with this many updates (0: every agent selected)

    def offer(self, meta: ModelUpdate, tensors: dict[str, torch.Tensor], now: float) -> Accepted:
        """Accept an update or raise Rejection. Never changes anything on rejection."""
        if meta.round != self.number:
            raise Rejection("wrong_round", f"update for round {meta.round} during round {self.number}")
        if meta.agent_id not in self.selected:
            raise Rejection("not_selected", f"agent {meta.agent_id} was not selected for round {self.number}")
        if meta.agent_id in self.accepted:
            raise Rejection("duplicate", f"agent {meta.agent_id} already answered round {self.number}")
        if self.target and len(self.accepted) >= self.target:
            raise Rejection("surplus", f"round {self.number} has its {self.target} updates (over-selection): "
                                       f"{meta.agent_id}'s is not needed")
        if now > self.deadline:
            raise Rejection("late", f"update from {meta.agent_id} arrived after the deadline")
        if meta.base_version != self.global_version:
            raise Rejection(
                "stale", f"update from {meta.agent_id} trained from v{meta.base_version}, round uses v{self.global_version}"
            )
        try:
            check_adapter_state(dict(self.expected), tensors, num_examples=meta.num_examples, agent_id=meta.agent_id)
        except InvalidUpdate as e:
            raise Rejection(e.reason, str(e)) from None
        acc = Accepted(meta, tensors, now)
        self.accepted[meta.agent_id] = acc
        return acc

    def status(self, now: float) -> Outcome:
        if len(self.accepted) == len(self.selected) or (self.target and len(self.accepted) >= self.target):
            return Outcome.complete
        if now <= self.deadline:
            return Outcome.collecting
        return Outcome.deadline if len(self.accepted) >= self.quorum else Outcome.failed

    @property
    def dropped(self) -> list[str]:
        return [a for a in self.selected if a not in self.accepted]


def selection_size(online: int, per_round: int = 0, fraction: float = 0.0, minimum: int = 1) -> int:
    """How many of `online` agents a round selects: per_round if set, else ceil(fraction x online)
    if fraction is set (at least `minimum`), else all (0)."""
    if per_round:
        return per_round
    if fraction:
        return min(online, max(minimum, math.ceil(fraction * online - 1e-9)))
    return 0


def over_selected(target: int, online: int, factor: float) -> int:
    """Agents to ask for a round that needs `target` updates, over-selecting by `factor` (Bonawitz et
    al. 2019: ~1.3 absorbs a few percent of dropouts without waiting for the deadline)."""
    return min(online, math.ceil(target * factor - 1e-9)) if target else 0


def select_agents(online: list[str], k: int, round_number: int, seed: int) -> tuple[str, ...]:
    """All online agents (k = 0) or k of them, chosen by a generator seeded by (seed, round)."""
    pool = sorted(set(online))
    if k <= 0 or k >= len(pool):
        return tuple(pool)
    rng = random.Random(f"{seed}:{round_number}")
    return tuple(sorted(rng.sample(pool, k)))
