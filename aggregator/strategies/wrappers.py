"""Wrappers around another strategy: `clip` bounds each client's delta before the inner one
sees it (differential privacy, the other wrapper, is in dp.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Iterator, Mapping

import torch
from pydantic import Field

from aggregator.strategies.base import (ClientUpdate, StateDict, Strategy, StrategyBase, StrategyOptions, apply_delta,
    clip_by_norm, delta_of, ensure_checked, parse_options, require_current)
from aggregator.strategies.registry import register, resolve_inner

__all__ = ["Clip", "ClipOptions"]


class ClipOptions(StrategyOptions):
    bound: float = Field(gt=0, description="L2 bound C on each client's delta (all tensors together)")


@register
class Clip(StrategyBase):
    """Wrapper: scale each client's delta to norm <= bound, then hand the updates (as
    current + clipped delta, other fields unchanged) to `inner`. Streams if inner streams.

    `last_norms` holds the norms before clipping, `last_clipped` the agent ids that were
    clipped, for the last aggregate(). report(): clipped, then the inner strategy's keys;
    diagnostics(): clipped and unclipped_norms ({agent: norm before clipping})."""

    name = "clip"

    def __init__(self, inner: Strategy | str = "fedavg", *, bound: float | None = None,
                 inner_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        if bound is not None:
            options["bound"] = bound
        self.options: ClipOptions = parse_options(ClipOptions, self.name, options)
        self.inner = resolve_inner(inner, inner_options, self.name)
        self.last_norms: dict[str, float] = {}
        self.last_clipped: list[str] = []

    def clipped(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
        """The updates with clipped deltas, lazily. Their tensors are new, so they are not marked
        checked: the inner strategy checks them as it would any update."""
        norms: dict[str, float] = {}
        clipped: list[str] = []
        self.last_norms, self.last_clipped = norms, clipped
        for u in updates:
            ensure_checked(current, u)
            d, norm = clip_by_norm(delta_of(current, u.tensors), self.options.bound)
            norms[u.agent_id] = norm
            if norm > self.options.bound:
                clipped.append(u.agent_id)
            yield replace(u, tensors=apply_delta(current, d), checked=False)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        require_current(current, self.name)
        return self.inner.aggregate(current, self.clipped(current, updates))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clipped": list(self.last_clipped)}
        out.update({k: v for k, v in self.inner.report().items() if k not in out})
        return out

    def diagnostics(self) -> dict[str, Any]:
        return {"clipped": list(self.last_clipped), "unclipped_norms": dict(self.last_norms)}

    def state_dict(self) -> dict[str, Any] | None:
        sd = getattr(self.inner, "state_dict", None)
        return {"strategy": self.name, "inner": sd() if sd else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("inner") is not None:
            self.inner.load_state_dict(state["inner"])  # type: ignore[attr-defined]
