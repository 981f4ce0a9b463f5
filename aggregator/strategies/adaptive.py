"""Adaptive server optimisers on the mean client delta: FedAdam and FedYogi (Reddi et al. 2021)."""

from __future__ import annotations

import base64
from typing import Any, Iterable, Mapping

import torch
from pydantic import Field

from aggregator.strategies.averaging import mean_delta
from aggregator.strategies.base import (
    ClientUpdate,
    StateDict,
    StrategyBase,
    StrategyOptions,
    parse_options,
    require_current,
)
from aggregator.strategies.registry import register

__all__ = ["FedAdam", "FedOpt", "FedOptOptions", "FedYogi"]


class FedOptOptions(StrategyOptions):
    eta: float = Field(1e-2, gt=0, description="server learning rate")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
    b2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptivity: added to sqrt(v) in the denominator")
    v0: float | None = Field(None, ge=0, description="initial second moment (default tau**2, as in the paper)")
    weighted: bool = Field(True, description="weight the mean delta by num_examples (else uniform)")


class FedOpt(StrategyBase):
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
        self.options: FedOptOptions = parse_options(FedOptOptions, self.name, options)
        self.reset()

    def reset(self) -> None:
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.step = 0

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def tree_weighted(self) -> bool:
        """How a tree of replicas (aggregator/tree.py) weighs the deltas it sums: as this strategy does."""
        return self.options.weighted

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        require_current(current, self.name)
        return self.step_from_mean(current, mean_delta(current, updates, weighted=self.options.weighted))

    def step_from_mean(self, current: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor]) -> StateDict:
        """The server step on the mean client delta `g` (float64): what aggregate() does after averaging,
        and what the master of a tree of replicas does with their combined partial sums."""
        require_current(current, self.name)
        if self.m and set(self.m) != set(current):
            diff = sorted(set(self.m) ^ set(current))[:3]
            raise ValueError(
                f"{self.name}: the global adapter's tensors changed since the optimiser state was made "
                f"({diff}); call reset() to start the server optimiser afresh"
            )
        o = self.options
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


@register
class FedAdam(FedOpt):
    """FedAdam: v = b2 * v + (1 - b2) * g^2."""

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        b2 = self.options.b2
        return b2 * v + (1 - b2) * g2


@register
class FedYogi(FedOpt):
    """FedYogi: v = v - (1 - b2) * g^2 * sign(v - g^2)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.options.b2) * g2 * torch.sign(v - g2)
