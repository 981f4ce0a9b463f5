"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) as a pure class.

Agents train from whatever global version they last received and send their update when
done; there are no rounds. The buffer holds the global state and its version. `add(update)`
takes one update and, once `buffer_size` (B) updates have been taken since the last step,
applies them and returns the new global (version + 1); otherwise it returns None.

The step, with x the current global and, for each buffered update i, n_i its num_examples,
tau_i its staleness and delta_i = tensors_i - (the global of the version it started from):

    x <- x + server_lr * sum_i n_i * s(tau_i) * delta_i / sum_i n_i

    s(t) = 1 / (1 + t) ** a     staleness_weight="polynomial" (FedBuff's choice, a = 0.5)
    s(t) = 1                    staleness_weight="constant"

Staleness is versions behind: tau = version now - base version. The weights are normalised
by the examples only, not by s, so a buffer of stale updates moves the model less than a
buffer of fresh ones (with all tau = 0 this is FedAvg of the deltas).

Base version: `update.base_version` when set (the wire's ModelUpdate.base_version), else
version now - `update.staleness`. The buffer keeps the last `max_staleness` + 1 globals to
compute deltas against; an update staler than `max_staleness`, or from a version that does
not exist yet, is refused (StaleUpdate).

Exactly once: an update is identified by (agent_id, nonce) when it has a nonce (the wire's
ModelUpdate.nonce, fresh per update), else by (agent_id, base_version), i.e. one update per
agent per global version. A second update with the same identity raises DuplicateUpdate and
changes nothing; identities are remembered for as long as their base version is within
max_staleness (after that the update would be refused as stale anyway), so memory is bounded.

Every refusal (DuplicateUpdate, StaleUpdate, strategies.InvalidUpdate) happens before any
state changes. Not thread-safe: own it from one thread (the service loop's worker), as with
the round state machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from pydantic import Field

from aggregator.strategies.base import (
    ClientUpdate,
    InvalidUpdate,
    StateDict,
    StrategyOptions,
    delta_of,
    ensure_checked,
    parse_options,
)


class DuplicateUpdate(InvalidUpdate):
    """This update (same identity) was already taken."""

    def __init__(self, message: str, agent_id: str) -> None:
        super().__init__("duplicate", message, agent_id)


class StaleUpdate(InvalidUpdate):
    """Base version older than max_staleness, or newer than the current version."""

    def __init__(self, message: str, agent_id: str) -> None:
        super().__init__("stale", message, agent_id)


def polynomial_staleness(t: int, a: float = 0.5) -> float:
    """s(t) = 1 / (1 + t)^a."""
    if t < 0:
        raise ValueError(f"staleness must be >= 0, got {t}")
    return 1.0 / (1.0 + t) ** a


def constant_staleness(t: int, a: float = 0.5) -> float:
    """s(t) = 1."""
    if t < 0:
        raise ValueError(f"staleness must be >= 0, got {t}")
    return 1.0


STALENESS_WEIGHTS: dict[str, Callable[[int, float], float]] = {
    "polynomial": polynomial_staleness,
    "constant": constant_staleness,
}


class AsyncBufferOptions(StrategyOptions):
    buffer_size: int = Field(ge=1, description="B: updates per server step")
    staleness_weight: Literal["polynomial", "constant"] = "polynomial"
    a: float = Field(0.5, ge=0, description="exponent of the polynomial staleness weight")
    server_lr: float = Field(1.0, gt=0, description="server learning rate on the weighted delta")
    max_staleness: int = Field(10, ge=0, description="refuse updates more versions behind than this")
    version: int = Field(0, ge=0, description="version of the initial global state")


@dataclass(frozen=True)
class Applied:
    """One buffered update's part in the last step."""

    agent_id: str
    base_version: int
    staleness: int
    num_examples: int
    weight: float  # n * s(staleness), before dividing by the sum of n


class AsyncBuffer:
    """FedBuff buffer over one global adapter state (see the module docstring)."""

    name = "fedbuff"

    def __init__(self, buffer_size: int, staleness_weight: str = "polynomial", a: float = 0.5, *,
                 global_state: Mapping[str, torch.Tensor], **options: Any) -> None:
        self.options: AsyncBufferOptions = parse_options(
            AsyncBufferOptions, self.name, dict(buffer_size=buffer_size, staleness_weight=staleness_weight, a=a, **options)
        )
        if not global_state:
            raise ValueError("the async buffer needs a non-empty initial global state")
        self._s = STALENESS_WEIGHTS[self.options.staleness_weight]
        self.version = self.options.version
        self._globals: dict[int, StateDict] = {self.version: {k: t.detach().clone() for k, t in global_state.items()}}
        self._seen: dict[tuple[str, str], int] = {}  # identity -> base version
        self._reset_buffer()
        self.last_applied: list[Applied] = []

    def _reset_buffer(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._examples = 0
        self._pending: list[Applied] = []

    # -- read-only views ------------------------------------------------------------------------
    @property
    def global_state(self) -> StateDict:
        """A copy of the current global state."""
        return {k: t.clone() for k, t in self._globals[self.version].items()}

    @property
    def pending(self) -> int:
        """Updates taken since the last step."""
        return len(self._pending)

    def staleness_factor(self, t: int) -> float:
        return self._s(t, self.options.a)

    @staticmethod
    def identity(update: ClientUpdate, base_version: int) -> tuple[str, str]:
        """The key that makes an update count once: (agent_id, nonce) or (agent_id, base version)."""
        return (update.agent_id, f"nonce:{update.nonce}" if update.nonce is not None else f"v{base_version}")

    # -- the one mutating entry point -------------------------------------------------------------
    def add(self, update: ClientUpdate) -> StateDict | None:
        """Take one update; return the new global when it completes a buffer, else None.

        Raises DuplicateUpdate, StaleUpdate or InvalidUpdate (and changes nothing) instead."""
        o = self.options
        base = update.base_version if update.base_version is not None else self.version - update.staleness
        key = self.identity(update, base)
        if key in self._seen:
            raise DuplicateUpdate(f"update {key[1]} from {update.agent_id} was already taken", update.agent_id)
        if base > self.version:
            raise StaleUpdate(
                f"update from {update.agent_id} claims base version {base}, but the global is only at v{self.version}",
                update.agent_id,
            )
        staleness = self.version - base
        if staleness > o.max_staleness or base not in self._globals:
            raise StaleUpdate(
                f"update from {update.agent_id} trained from v{base}, {staleness} versions behind v{self.version} "
                f"(max_staleness {o.max_staleness})",
                update.agent_id,
            )
        base_state = self._globals[base]
        ensure_checked(base_state, update)  # unless the boundary checked it (update.checked)
        weight = update.num_examples * self.staleness_factor(staleness)
        if not (weight > 0 and math.isfinite(weight)):
            raise InvalidUpdate("bad_weight", f"update from {update.agent_id}: weight {weight}", update.agent_id)
        delta = delta_of(base_state, update.tensors)
        # accepted: from here on nothing raises
        for k, d in delta.items():
            if k in self._sum:
                self._sum[k].add_(d, alpha=weight)
            else:
                self._sum[k] = d.mul_(weight)
        self._examples += int(update.num_examples)
        self._pending.append(Applied(update.agent_id, base, staleness, int(update.num_examples), weight))
        self._seen[key] = base
        if len(self._pending) >= o.buffer_size:
            return self._step()
        return None

    def flush(self) -> StateDict | None:
        """Apply a partly filled buffer now (e.g. on a timeout); None when it is empty."""
        return self._step() if self._pending else None

    def _step(self) -> StateDict:
        o = self.options
        cur = self._globals[self.version]
        scale = o.server_lr / self._examples
        new = {k: (c.to(torch.float64) + scale * self._sum[k]).to(c.dtype) for k, c in cur.items()}
        self.version += 1
        self._globals[self.version] = new
        oldest = self.version - o.max_staleness
        for v in [v for v in self._globals if v < oldest]:
            del self._globals[v]
        for k in [k for k, b in self._seen.items() if b < oldest]:
            del self._seen[k]
        self.last_applied = self._pending
        self._reset_buffer()
        return {k: t.clone() for k, t in new.items()}
