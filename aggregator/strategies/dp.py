"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018); its RDP accountant is
in accountant.py.

`DPFedAvg` wraps a server strategy. Each round it

1. clips each client's delta (tensors - current, all tensors as one vector) to L2 norm
   <= clip_norm,
2. averages the clipped deltas UNWEIGHTED (uniform weights, 1/n each: num_examples is ignored,
   so that one client's contribution to the mean is bounded by clip_norm / n whatever it
   claims),
3. adds Gaussian noise N(0, std^2) to every coordinate of that mean, with
   std = noise_multiplier * clip_norm / n, n = the number of agents aggregated this round,
4. hands the inner strategy one synthetic update, current + noisy mean delta, so that the
   inner strategy (fedavg: take it as is; fedadam/fedyogi: use it as the pseudo-gradient)
   decides the server step,
5. records the round in an RDP accountant for the subsampled Gaussian mechanism, with sample
   rate q = sampling_rate, or n / num_agents when the population size is given instead.

After each round `last_clip_norms` (norms after clipping, in arrival order),
`last_unclipped_norms`, `noise_std`, `last_sample_rate` and, when `delta` is set,
`last_epsilon` = epsilon(delta) so far, are there to log and export (report() and
diagnostics() hand them out under the service's and the simulator's keys).

Caveats, stated rather than hidden:
- The accountant assumes each agent takes part in a round independently with probability q
  (Poisson sampling), as in McMahan et al. 2018; choosing a fixed number of agents uniformly
  is the usual approximation of it. Dividing by the realised n (not the expected qN) follows
  the brief; with Poisson sampling the count itself is then not hidden.
- The noise comes from torch's Mersenne-Twister generator, which is not a cryptographic
  generator. `seed` is for tests and reproducible experiments; leave it None in production
  (seeded from os.urandom). The generator state is deliberately not checkpointed: replaying
  the same noise on a re-run round would let the two releases be differenced.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from pydantic import Field, model_validator

from aggregator.strategies.accountant import PrivacyAccountant
from aggregator.strategies.base import (ClientUpdate, StateDict, Strategy, StrategyBase, StrategyOptions,
    StrategyOptionsError, apply_delta, clip_by_norm, delta_of, ensure_checked, global_norm, parse_options,
    require_current)
from aggregator.strategies.registry import register, resolve_inner

__all__ = ["DPFedAvg", "DPFedAvgOptions"]


class DPFedAvgOptions(StrategyOptions):
    clip_norm: float = Field(gt=0, description="L2 bound C on each client's delta")
    noise_multiplier: float = Field(ge=0, description="z: noise std on the mean is z * C / n")
    sampling_rate: float | None = Field(None, gt=0, le=1, description="q: chance an agent takes part in a round")
    num_agents: int | None = Field(None, ge=1, description="population size N; q = n / N per round")
    seed: int | None = Field(None, description="noise generator seed (tests only; None: os.urandom)")
    delta: float | None = Field(None, gt=0, lt=1, description="report last_epsilon at this delta after each round")

    @model_validator(mode="after")
    def _one_rate(self):
        if (self.sampling_rate is None) == (self.num_agents is None):
            raise ValueError("give exactly one of sampling_rate (q) or num_agents (the population size)")
        return self


_SINGLE_UPDATE_UNFIT = {"median", "trimmed_mean", "krum"}


@register
class DPFedAvg(StrategyBase):
    """Client-level DP wrapper (see the module docstring for the exact mechanism)."""

    name = "dp_fedavg"

    def __init__(self, inner: Strategy | str = "fedavg", *, inner_options: Mapping[str, Any] | None = None,
                 orders: Sequence[float] | None = None, **options: Any) -> None:
        self.options: DPFedAvgOptions = parse_options(DPFedAvgOptions, self.name, options)
        self.inner = resolve_inner(inner, inner_options, self.name)
        if getattr(self.inner, "name", None) in _SINGLE_UPDATE_UNFIT:
            raise StrategyOptionsError(
                f"{self.name}: inner strategy {self.inner.name!r} would aggregate a single noised mean; "
                "use a server optimiser (fedavg, fedadam, fedyogi) as inner"
            )
        seed = self.options.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._gen = torch.Generator().manual_seed(seed)
        self.accountant = PrivacyAccountant(orders)
        self.last_clip_norms: list[float] = []
        self.last_unclipped_norms: list[float] = []
        self.noise_std: float | None = None
        self.last_sample_rate: float | None = None
        self.last_epsilon: float | None = None

    @property
    def rounds(self) -> int:
        return self.accountant.rounds

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)

    def report(self) -> dict[str, Any]:
        """dp_noise_std, dp_sample_rate, dp_epsilon (each once known), dp_delta, dp_rounds,
        dp_clipped (agents whose delta was over clip_norm), then the inner strategy's keys."""
        o = self.options
        out: dict[str, Any] = {}
        for key, v in (("dp_noise_std", self.noise_std), ("dp_sample_rate", self.last_sample_rate),
                       ("dp_epsilon", self.last_epsilon)):
            if v is not None:
                out[key] = v
        out.update(dp_delta=o.delta, dp_rounds=self.rounds,
                   dp_clipped=sum(n > o.clip_norm for n in self.last_unclipped_norms))
        out.update({k: v for k, v in self.inner.report().items() if k not in out})
        return out

    def diagnostics(self) -> dict[str, Any]:
        """clip_norms and unclipped_norms (lists, in arrival order), noise_std, sample_rate,
        noise_multiplier, clip_norm, delta and epsilon (None until known, or when infinite)."""
        o = self.options
        eps = self.last_epsilon
        return dict(clip_norms=list(self.last_clip_norms), unclipped_norms=list(self.last_unclipped_norms),
                    noise_std=self.noise_std, sample_rate=self.last_sample_rate, noise_multiplier=o.noise_multiplier,
                    clip_norm=o.clip_norm, delta=o.delta, epsilon=None if eps is None or not math.isfinite(eps) else eps)

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
        require_current(current, self.name)
        o = self.options
        total: dict[str, torch.Tensor] = {}
        clipped_norms: list[float] = []
        raw_norms: list[float] = []
        for u in updates:  # streams: one clipped delta at a time
            ensure_checked(current, u)
            d, norm = clip_by_norm(delta_of(current, u.tensors), o.clip_norm)
            raw_norms.append(norm)
            clipped_norms.append(global_norm(d))
            for k, t in d.items():
                if k in total:
                    total[k].add_(t)
                else:
                    total[k] = t
        n = len(clipped_norms)
        if n == 0:
            raise ValueError("no updates to aggregate")
        if o.sampling_rate is not None:
            q = o.sampling_rate
        else:
            assert o.num_agents is not None
            if n > o.num_agents:
                raise ValueError(
                    f"{n} agents in this round but num_agents (the population size) is {o.num_agents}: "
                    "set num_agents to the size of the fleet"
                )
            q = n / o.num_agents
        std = o.noise_multiplier * o.clip_norm / n
        noisy = {}
        for k, s in total.items():
            mean = s / n
            if std > 0:
                mean = mean + torch.normal(0.0, std, size=mean.shape, generator=self._gen, dtype=torch.float64)
            noisy[k] = mean
        synthetic = ClientUpdate("dp-aggregate", apply_delta(current, noisy), 1)  # the inner checks it
        new = self.inner.aggregate(current, [synthetic])
        # released: account for it and expose the round's numbers
        self.accountant.step(noise_multiplier=o.noise_multiplier, sample_rate=q)
        self.last_clip_norms, self.last_unclipped_norms = clipped_norms, raw_norms
        self.noise_std, self.last_sample_rate = std, q
        if o.delta is not None:
            self.last_epsilon = self.accountant.epsilon(o.delta)
        return new

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the accountant's history and the inner strategy's state."""
        sd = getattr(self.inner, "state_dict", None)
        return {"strategy": self.name, "accountant": self.accountant.state_dict(), "inner": sd() if sd else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(f"state is for strategy {state.get('strategy')!r}, not {self.name!r}")
        self.accountant.load_state_dict(state["accountant"])
        if state.get("inner") is not None:
            self.inner.load_state_dict(state["inner"])  # type: ignore[attr-defined]
