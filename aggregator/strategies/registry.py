"""Strategies by name: `STRATEGIES`, `make_strategy(name, **options)`.

Each strategy module registers its classes with `@register` (keyed by the class's `name`);
the package's __init__ imports every strategy module, so the table is complete whenever any
part of the package is imported. This module imports none of them, so that wrappers can
build their inner strategy by name without an import cycle.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from aggregator.strategies.base import Strategy, StrategyOptionsError

__all__ = ["STRATEGIES", "make_strategy", "register", "resolve_inner"]

STRATEGIES: dict[str, Callable[..., Strategy]] = {}

S = TypeVar("S", bound=type)


def register(cls: S) -> S:
    """Class decorator: make `cls` available to make_strategy under `cls.name`."""
    name = cls.name  # type: ignore[attr-defined]
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is registered twice")
    STRATEGIES[name] = cls
    return cls


def make_strategy(name: str, **options: Any) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(**options)


def resolve_inner(inner: Strategy | str, inner_options: Mapping[str, Any] | None, wrapper: str) -> Strategy:
    """A wrapper's inner strategy: built by name with `inner_options`, or the object given."""
    if isinstance(inner, str):
        return make_strategy(inner, **dict(inner_options or {}))
    if inner_options:
        raise StrategyOptionsError(f"{wrapper}: inner_options only apply when inner is given by name")
    if not callable(getattr(inner, "aggregate", None)):
        raise StrategyOptionsError(f"{wrapper}: inner must be a strategy name or an object with aggregate(), got {inner!r}")
    return inner
