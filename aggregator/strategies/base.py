"""What every strategy shares: the update type, the protocol, options, the update check and the
delta helpers (all in float64)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from models.adapters import InvalidUpdate, check_adapter_state

__all__ = [
    "ClientUpdate", "InvalidUpdate", "NoOptions", "StateDict", "Strategy", "StrategyBase", "StrategyOptions",
    "StrategyOptionsError", "apply_delta", "check_update", "checked_updates", "clip_by_norm", "delta_of",
    "ensure_checked", "global_norm", "parse_options", "report", "require_current",
]

StateDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    agent_id: str
    tensors: Mapping[str, torch.Tensor]
    num_examples: int
    staleness: int = 0  # rounds between the global it started from and the current one
    base_version: int | None = None  # version of the global it started from (async buffer)
    nonce: str | None = None  # unique per update (the wire's ModelUpdate.nonce); dedup key
    # True once check_update (models.adapters.check_adapter_state with num_examples) passed
    # against a global of the same names, shapes and dtypes as the one it is aggregated into:
    # the boundary that checked it (the round machine, the service) sets it, and strategies
    # then do not check it again. Leave it False for anything not checked that way.
    checked: bool = False


class Strategy(Protocol):
    name: str

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict: ...

    def report(self) -> dict[str, Any]:
        """What the last aggregate() decided, under the keys of the service's metrics rows."""
        ...

    def diagnostics(self) -> dict[str, Any]:
        """The same decisions under the keys of the simulator's rows (see StrategyBase)."""
        ...


class StrategyBase:
    """Defaults for strategies that decide nothing worth reporting: both reports are empty.

    report() feeds the service's metrics rows (and `edgetune_aggregator_dp_epsilon`): keys
    krum_selected, clipped, dp_noise_std, dp_sample_rate, dp_epsilon, dp_delta, dp_rounds,
    dp_clipped; wrappers add their inner strategy's keys. diagnostics() feeds the simulator's
    rows: keys krum_selected, clipped, unclipped_norms, clip_norms, noise_std, sample_rate,
    noise_multiplier, clip_norm, delta, epsilon; only the strategy's own decisions (a
    wrapper's inner is not merged)."""

    name = "strategy"

    def report(self) -> dict[str, Any]:
        return {}

    def diagnostics(self) -> dict[str, Any]:
        return {}


def report(strategy: Strategy) -> dict[str, Any]:
    """What the last aggregate() decided, for the run's metrics file (strategy.report())."""
    return strategy.report()


class StrategyOptionsError(ValueError):
    """Bad constructor options for a strategy."""


# -- options ----------------------------------------------------------------------------------


class StrategyOptions(BaseModel):
    """Base of every strategy's options model: unknown options are an error, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(StrategyOptions):
    pass


def parse_options(model: type[StrategyOptions], strategy: str, options: Mapping[str, Any]) -> Any:
    """`model(**options)`, or StrategyOptionsError naming each bad option and the ones it takes."""
    try:
        return model(**options)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing") else "")
            for err in e.errors()
        )
        allowed = ", ".join(model.model_fields) or "none"
        raise StrategyOptionsError(
            f"invalid options for strategy {strategy!r}: {problems}. Options it takes: {allowed}"
        ) from None


# -- the update check ---------------------------------------------------------------------------


def check_update(current: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    """Raise InvalidUpdate unless the update has a positive integer example count, current's
    names, shapes and dtypes, and finite values (models.adapters.check_adapter_state). Skips the
    names/shapes/dtypes check when `current` is empty."""
    check_adapter_state(current if current else None, update.tensors, num_examples=update.num_examples,
                        agent_id=update.agent_id)


def ensure_checked(current: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    """check_update, unless the boundary already did (`update.checked`)."""
    if not update.checked:
        check_update(current, update)


def checked_updates(current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
    """The updates, lazily, each after ensure_checked."""
    for u in updates:
        ensure_checked(current, u)
        yield u


def require_current(current: Mapping[str, torch.Tensor], strategy: str) -> None:
    if not current:
        raise ValueError(f"strategy {strategy!r} works on deltas and needs the current global state, got an empty one")


# -- deltas -------------------------------------------------------------------------------------


def delta_of(current: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> StateDict:
    """tensors - current, in float64."""
    return {k: tensors[k].detach().to(torch.float64) - current[k].detach().to(torch.float64) for k in current}


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors taken together as one vector."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors.values()))


def clip_by_norm(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[StateDict, float]:
    """Scale `delta` by min(1, bound / ||delta||) (the norm over all its tensors together).

    Returns (clipped delta in float64, norm before clipping)."""
    if bound <= 0:
        raise ValueError(f"clipping bound must be positive, got {bound}")
    norm = global_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: t.detach().to(torch.float64) * scale for k, t in delta.items()}, norm


def apply_delta(current: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """current + scale * delta, cast back to each tensor's dtype."""
    return {k: (c.detach().to(torch.float64) + scale * delta[k]).to(c.dtype) for k, c in current.items()}
