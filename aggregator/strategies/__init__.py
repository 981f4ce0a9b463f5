"""Aggregation strategies: pure functions and small classes over (adapter tensors, examples).

They import neither paho nor prometheus_client. A strategy takes the current global adapter
state and an iterable of client updates and returns the new global state; it never changes
`current` or the updates in place, and it raises (leaving its own state as it was) instead of
returning a model built from bad input.

An update's `tensors` is the agent's full adapter state after local training, not a delta;
`current` is the global state it started from. Strategies that work on deltas compute
`delta = tensors - current` themselves.

Checking: every strategy checks each update (`check_update`: example count, names, shapes,
dtypes, finite values; one validator, models.adapters.check_adapter_state, raising
InvalidUpdate) unless the update arrives with `checked=True`, set by the boundary that has
already run that check.

Streaming: FedAvg, FedAdam/FedYogi and the `clip` wrapper (around a streaming strategy)
consume the iterable once and keep one accumulator, so a caller can decode one update, hand
it over and drop it, and memory stays flat in the number of agents. The robust strategies
(median, trimmed_mean, krum) need every update at once and materialise the list.

Reports: after aggregate(), `report()` gives the strategy's decisions under the service's
metrics-row keys, `diagnostics()` under the simulator's (see base.StrategyBase); the
module-level `report(strategy)` is strategy.report().

Modules:

    base        ClientUpdate, Strategy, options (StrategyOptions, parse_options), check_update,
                delta/norm/clip helpers
    averaging   WeightedMean, fedavg, mean_delta, FedAvg
    adaptive    FedOpt, FedAdam, FedYogi
    robust      Median, TrimmedMean, Krum and their coordinate-wise functions
    wrappers    Clip
    dp          DPFedAvg;  accountant: the RDP accountant it uses
    registry    STRATEGIES, make_strategy, register, resolve_inner

Registry (`STRATEGIES`, `make_strategy(name, **options)`):

    fedavg        FedAvg()                               weighted by num_examples
    fedadam       FedAdam(eta, b1, b2, tau, v0, weighted) server Adam (Reddi et al. 2021)
    fedyogi       FedYogi(eta, b1, b2, tau, v0, weighted) server Yogi (Reddi et al. 2021)
    median        Median()                               coordinate-wise median
    trimmed_mean  TrimmedMean(beta)                      coordinate-wise trimmed mean
    krum          Krum(f, m)                             Krum / multi-Krum (Blanchard et al. 2017)
    clip          Clip(inner, bound, inner_options)      clip each delta to `bound`, then `inner`
    dp_fedavg     DPFedAvg(inner, clip_norm, ...)        client-level DP (McMahan et al. 2018)

The robust strategies ignore `num_examples` by default: it is reported by the client, and a
Byzantine client would simply claim a huge number.
"""

from __future__ import annotations

# base first, then each strategy module in registry order (each registers its classes on import)
from aggregator.strategies.base import (
    ClientUpdate, InvalidUpdate, NoOptions, StateDict, Strategy, StrategyBase, StrategyOptions,
    StrategyOptionsError, apply_delta, check_update, checked_updates, clip_by_norm, delta_of, ensure_checked,
    global_norm, parse_options, report, require_current,
)
from aggregator.strategies.registry import (
    STRATEGIES, make_strategy, register, resolve_inner,
)
from aggregator.strategies.averaging import (
    FedAvg, WeightedMean, fedavg, mean_delta,
)
from aggregator.strategies.adaptive import (
    FedAdam, FedOpt, FedOptOptions, FedYogi,
)
from aggregator.strategies.robust import (
    Krum, KrumOptions, Median, TrimmedMean, TrimmedMeanOptions, coordinate_median, coordinate_trimmed_mean,
    krum_scores, krum_select,
)
from aggregator.strategies.wrappers import (
    Clip, ClipOptions,
)
from aggregator.strategies.accountant import (
    DEFAULT_ORDERS, PrivacyAccountant, compute_rdp, get_privacy_spent, rdp_sampled_gaussian,
)
from aggregator.strategies.dp import (
    DPFedAvg, DPFedAvgOptions,
)

__all__ = [
    "ClientUpdate", "InvalidUpdate", "NoOptions", "StateDict", "Strategy", "StrategyBase", "StrategyOptions",
    "StrategyOptionsError", "apply_delta", "check_update", "checked_updates", "clip_by_norm", "delta_of",
    "ensure_checked", "global_norm", "parse_options", "report", "require_current", "STRATEGIES",
    "make_strategy", "register", "resolve_inner", "FedAvg", "WeightedMean", "fedavg", "mean_delta",
    "FedAdam", "FedOpt", "FedOptOptions", "FedYogi", "Krum", "KrumOptions", "Median", "TrimmedMean",
    "TrimmedMeanOptions", "coordinate_median", "coordinate_trimmed_mean", "krum_scores", "krum_select",
    "Clip", "ClipOptions", "DEFAULT_ORDERS", "PrivacyAccountant", "compute_rdp", "get_privacy_spent",
    "rdp_sampled_gaussian", "DPFedAvg", "DPFedAvgOptions",
]
