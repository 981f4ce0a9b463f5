"""Aggregation strategies: pure functions and small classes over (adapter tensors, examples).

They import neither paho nor prometheus_client. A strategy takes the current global adapter
state and an iterable of client updates and returns the new global state; it never changes
`current` or the updates in place, and it raises (leaving its own state as it was) instead of
returning a model built from bad input.

An update's `tensors` is the agent's full adapter state after local training, not a delta;
`current` is the global state it started from. Strategies that work on deltas compute
`delta = tensors - current` themselves.

Streaming: FedAvg, FedAdam/FedYogi and the `clip` wrapper (around a streaming strategy)
consume the iterable once and keep one accumulator, so a caller can decode one update, hand
it over and drop it, and memory stays flat in the number of agents. The robust strategies
(median, trimmed_mean, krum) need every update at once and materialise the list.

Registry (`STRATEGIES`, `make_strategy(name, **options)`):

    fedavg        FedAvg()                               weighted by num_examples
    fedadam       FedAdam(eta, b1, b2, tau, v0, weighted) server Adam (Reddi et al. 2021)
    fedyogi       FedYogi(eta, b1, b2, tau, v0, weighted) server Yogi (Reddi et al. 2021)
    median        Median()                               coordinate-wise median
    trimmed_mean  TrimmedMean(beta)                      coordinate-wise trimmed mean
    krum          Krum(f, m)                             Krum / multi-Krum (Blanchard et al. 2017)
    clip          Clip(inner, bound, inner_options)      clip each delta to `bound`, then `inner`
    dp_fedavg     aggregator.privacy.DPFedAvg            client-level DP (McMahan et al. 2018)

The robust strategies ignore `num_examples` by default: it is reported by the client, and a
Byzantine client would simply claim a huge number.
"""

from __future__ import annotations

import base64
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

StateDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    agent_id: str
    tensors: Mapping[str, torch.Tensor]
    num_examples: int
    staleness: int = 0  # rounds between the global it started from and the current one
    base_version: int | None = None  # version of the global it started from (async buffer)
    nonce: str | None = None  # unique per update (the wire's ModelUpdate.nonce); dedup key


class Strategy(Protocol):
    name: str

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict: ...


class InvalidUpdate(ValueError):
    """An update that must not be aggregated; `reason` suits a metrics label."""

    def __init__(self, reason: str, message: str, agent_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.agent_id = agent_id


class StrategyOptionsError(ValueError):
    """Bad constructor options for a strategy."""


# -- helpers ----------------------------------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _parse_options(model: type[_Options], strategy: str, options: Mapping[str, Any]) -> Any:
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


def check_update(current: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    """Raise InvalidUpdate unless the update has current's names and shapes, finite values and
    a positive example count. Skips the name/shape check when `current` is empty."""
    who = update.agent_id
    n = update.num_examples
    ok = not isinstance(n, bool) and isinstance(n, numbers.Real) and math.isfinite(n) and n == int(n) and n >= 1
    if not ok:
        raise InvalidUpdate("bad_num_examples", f"update from {who}: num_examples must be >= 1, got {update.num_examples!r}", who)
    if current:
        if set(update.tensors) != set(current):
            extra = sorted(set(update.tensors) - set(current))[:3]
            missing = sorted(set(current) - set(update.tensors))[:3]
            raise InvalidUpdate(
                "tensor_names", f"update from {who}: tensor names differ from the global (unexpected {extra}, missing {missing})", who
            )
        for k, t in update.tensors.items():
            if tuple(t.shape) != tuple(current[k].shape):
                raise InvalidUpdate(
                    "tensor_shape", f"update from {who}: tensor {k} has shape {tuple(t.shape)}, the global {tuple(current[k].shape)}", who
                )
    for k, t in update.tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidUpdate("non_finite", f"update from {who}: tensor {k} has NaN or Inf values", who)


def _require_current(current: Mapping[str, torch.Tensor], strategy: str) -> None:
    if not current:
        raise ValueError(f"strategy {strategy!r} works on deltas and needs the current global state, got an empty one")


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


def _dtypes(states: Sequence[Mapping[str, torch.Tensor]], current: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    ref = current if current else states[0]
    return {k: t.dtype for k, t in ref.items()}


def _materialise(current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> list[ClientUpdate]:
    ups = list(updates)
    if not ups:
        raise ValueError("no updates to aggregate")
    ref = current if current else ups[0].tensors
    for u in ups:
        check_update(ref, u)
    return ups


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

    def result64(self) -> StateDict:
        """The mean in float64 (no cast back)."""
        if not self.count:
            raise ValueError("no updates to average")
        return {k: s / self.total_weight for k, s in self._sum.items()}


# -- pure aggregation functions (Flower aggregate.py style) ----------------------------------


def fedavg(updates: Iterable[ClientUpdate]) -> StateDict:
    """Weighted FedAvg: sum_i n_i * w_i / sum_i n_i (McMahan et al. 2017)."""
    acc = WeightedMean()
    for u in updates:
        acc.add(u.tensors, float(u.num_examples))
    return acc.result()


def mean_delta(current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate], *, weighted: bool = True) -> StateDict:
    """Streaming mean of (tensors - current) over the updates, in float64.

    Weighted by num_examples when `weighted`, else uniform. Checks each update first."""
    acc = WeightedMean()
    for u in updates:
        check_update(current, u)
        acc.add(delta_of(current, u.tensors), float(u.num_examples) if weighted else 1.0)
    if not acc.count:
        raise ValueError("no updates to aggregate")
    return acc.result64()


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


class _NoOptions(_Options):
    pass


class FedAvg:
    """Weighted FedAvg of the clients' states (num_examples as weights). Streams."""

    name = "fedavg"

    def __init__(self, **options: Any) -> None:
        _parse_options(_NoOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        def checked() -> Iterator[ClientUpdate]:
            for u in updates:
                check_update(current, u)
                yield u

        return fedavg(checked())


class FedOptOptions(_Options):
    eta: float = Field(1e-2, gt=0, description="server learning rate")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
    b2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptivity: added to sqrt(v) in the denominator")
    v0: float | None = Field(None, ge=0, description="initial second moment (default tau**2, as in the paper)")
    weighted: bool = Field(True, description="weight the mean delta by num_examples (else uniform)")


class FedOpt:
    """Server-side adaptive optimiser on the mean client delta (Reddi et al. 2021, Algorithm 2).

    Each round:  g = mean_i (w_i - x)  (weighted by num_examples unless weighted=False)
                 m = b1 * m + (1 - b1) * g
                 v = second_moment(v, g)                     (FedAdam / FedYogi below)
                 x = x + eta * m / (sqrt(v) + tau)
    with m starting at 0 and v at v0 (default tau**2, the paper's v_{-1} >= tau^2), no bias
    correction. m and v live in this object across rounds, in float64; `state_dict()` returns
    them JSON-serialisable for a checkpoint.
    """

    name = "fedopt"

    def __init__(self, **options: Any) -> None:
        self.options: FedOptOptions = _parse_options(FedOptOptions, self.name, options)
        self.reset()

    def reset(self) -> None:
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.step = 0

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        _require_current(current, self.name)
        if self.m and set(self.m) != set(current):
            diff = sorted(set(self.m) ^ set(current))[:3]
            raise ValueError(
                f"{self.name}: the global adapter's tensors changed since the optimiser state was made "
                f"({diff}); call reset() to start the server optimiser afresh"
            )
        o = self.options
        g = mean_delta(current, updates, weighted=o.weighted)
        v0 = o.tau**2 if o.v0 is None else o.v0
        new_m, new_v, out = {}, {}, {}
        for k, c in current.items():
            m = self.m.get(k, torch.zeros_like(g[k]))
            v = self.v.get(k, torch.full_like(g[k], v0))
            new_m[k] = o.b1 * m + (1 - o.b1) * g[k]
            new_v[k] = self._second_moment(v, g[k].pow(2))
            out[k] = (c.detach().to(torch.float64) + o.eta * new_m[k] / (new_v[k].sqrt() + o.tau)).to(c.dtype)
        # commit only once everything is computed
        self.m, self.v, self.step = new_m, new_v, self.step + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: {"strategy", "step", "tensors": base64 safetensors of m.* and v.*}."""
        from safetensors.torch import save

        tensors = {f"m.{k}": t.contiguous() for k, t in self.m.items()}
        tensors.update({f"v.{k}": t.contiguous() for k, t in self.v.items()})
        blob = save(tensors) if tensors else b""
        return {"strategy": self.name, "step": self.step, "tensors": base64.b64encode(blob).decode("ascii")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from safetensors.torch import load

        if state.get("strategy") != self.name:
            raise ValueError(f"optimiser state is for strategy {state.get('strategy')!r}, not {self.name!r}")
        blob = base64.b64decode(state["tensors"])
        tensors = load(blob) if blob else {}
        m = {k[2:]: t for k, t in tensors.items() if k.startswith("m.")}
        v = {k[2:]: t for k, t in tensors.items() if k.startswith("v.")}
        if set(m) != set(v) or len(m) + len(v) != len(tensors):
            raise ValueError("optimiser state is corrupt: m and v name different tensors")
        step = int(state["step"])
        if step < 0 or (step == 0) != (not m):
            raise ValueError(f"optimiser state is corrupt: step {step} with {len(m)} tensors")
        self.m, self.v, self.step = m, v, step


class FedAdam(FedOpt):
    """FedAdam: v = b2 * v + (1 - b2) * g^2."""

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        b2 = self.options.b2
        return b2 * v + (1 - b2) * g2


class FedYogi(FedOpt):
    """FedYogi: v = v - (1 - b2) * g^2 * sign(v - g^2)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.options.b2) * g2 * torch.sign(v - g2)


class Median:
    """Coordinate-wise median of the clients' states (unweighted; even n: mean of the middle two)."""

    name = "median"

    def __init__(self, **options: Any) -> None:
        _parse_options(_NoOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        ups = _materialise(current, updates)
        states = [u.tensors for u in ups]
        dtypes = _dtypes(states, current)
        return {k: t.to(dtypes[k]) for k, t in coordinate_median(states).items()}


class TrimmedMeanOptions(_Options):
    beta: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end, per coordinate")


class TrimmedMean:
    """Coordinate-wise trimmed mean: drop floor(beta * n) values at each end, average the rest
    (unweighted)."""

    name = "trimmed_mean"

    def __init__(self, **options: Any) -> None:
        self.options: TrimmedMeanOptions = _parse_options(TrimmedMeanOptions, self.name, options)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        ups = _materialise(current, updates)
        states = [u.tensors for u in ups]
        dtypes = _dtypes(states, current)
        return {k: t.to(dtypes[k]) for k, t in coordinate_trimmed_mean(states, self.options.beta).items()}


class KrumOptions(_Options):
    f: int = Field(0, ge=0, description="assumed number of Byzantine clients")
    m: int = Field(1, ge=1, description="how many lowest-score updates to average (1: Krum, >1: multi-Krum)")
    weighted: bool = Field(False, description="weight the selected updates by num_examples (else uniform)")


class Krum:
    """Krum / multi-Krum (Blanchard et al. 2017).

    score(i) = sum of squared distances from update i to its n - f - 2 nearest others; the m
    updates with the lowest scores are averaged (uniformly unless weighted=True). Needs
    n >= 2f + 3 updates (the paper's n > 2f + 2) and m <= n - f; refuses the round otherwise.
    `last_selected` holds the agent ids chosen in the last round."""

    name = "krum"

    def __init__(self, **options: Any) -> None:
        self.options: KrumOptions = _parse_options(KrumOptions, self.name, options)
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


def _resolve_inner(inner: Strategy | str, inner_options: Mapping[str, Any] | None, wrapper: str) -> Strategy:
    if isinstance(inner, str):
        return make_strategy(inner, **dict(inner_options or {}))
    if inner_options:
        raise StrategyOptionsError(f"{wrapper}: inner_options only apply when inner is given by name")
    if not callable(getattr(inner, "aggregate", None)):
        raise StrategyOptionsError(f"{wrapper}: inner must be a strategy name or an object with aggregate(), got {inner!r}")
    return inner


class ClipOptions(_Options):
    bound: float = Field(gt=0, description="L2 bound C on each client's delta (all tensors together)")


class Clip:
    """Wrapper: scale each client's delta to norm <= bound, then hand the updates (as
    current + clipped delta, other fields unchanged) to `inner`. Streams if inner streams.

    `last_norms` holds the norms before clipping, `last_clipped` the agent ids that were
    clipped, for the last aggregate()."""

    name = "clip"

    def __init__(self, inner: Strategy | str = "fedavg", *, bound: float | None = None,
                 inner_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        if bound is not None:
            options["bound"] = bound
        self.options: ClipOptions = _parse_options(ClipOptions, self.name, options)
        self.inner = _resolve_inner(inner, inner_options, self.name)
        self.last_norms: dict[str, float] = {}
        self.last_clipped: list[str] = []

    def clipped(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
        """The updates with clipped deltas, lazily."""
        norms: dict[str, float] = {}
        clipped: list[str] = []
        self.last_norms, self.last_clipped = norms, clipped
        for u in updates:
            check_update(current, u)
            d, norm = clip_by_norm(delta_of(current, u.tensors), self.options.bound)
            norms[u.agent_id] = norm
            if norm > self.options.bound:
                clipped.append(u.agent_id)
            yield ClientUpdate(u.agent_id, apply_delta(current, d), u.num_examples, u.staleness, u.base_version, u.nonce)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        _require_current(current, self.name)
        return self.inner.aggregate(current, self.clipped(current, updates))

    def state_dict(self) -> dict[str, Any] | None:
        sd = getattr(self.inner, "state_dict", None)
        return {"strategy": self.name, "inner": sd() if sd else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("inner") is not None:
            self.inner.load_state_dict(state["inner"])  # type: ignore[attr-defined]


def _dp_fedavg(*args: Any, **options: Any) -> Strategy:
    from aggregator.privacy import DPFedAvg  # privacy imports this module: import it late

    return DPFedAvg(*args, **options)


_dp_fedavg.name = "dp_fedavg"  # type: ignore[attr-defined]

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "clip": Clip,
    "dp_fedavg": _dp_fedavg,
}


def make_strategy(name: str, **options) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(**options)


def report(strategy: Strategy) -> dict[str, Any]:
    """What the last aggregate() decided, for the run's metrics file: Krum's choice, who was
    clipped, DP's noise and spent epsilon; wrappers report their inner strategy's too."""
    out: dict[str, Any] = {}
    for attr, key in (("last_selected", "krum_selected"), ("last_clipped", "clipped"), ("noise_std", "dp_noise_std"),
                      ("last_sample_rate", "dp_sample_rate"), ("last_epsilon", "dp_epsilon")):
        v = getattr(strategy, attr, None)
        if v is not None:
            out[key] = v
    options = getattr(strategy, "options", None)
    if getattr(strategy, "name", None) == "dp_fedavg":
        out["dp_delta"] = options.delta
        out["dp_rounds"] = strategy.rounds  # type: ignore[attr-defined]
        out["dp_clipped"] = sum(n > options.clip_norm for n in strategy.last_unclipped_norms)  # type: ignore[attr-defined]
    inner = getattr(strategy, "inner", None)
    if inner is not None:
        out.update({k: v for k, v in report(inner).items() if k not in out})
    return out
