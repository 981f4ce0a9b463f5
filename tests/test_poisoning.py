"""Poisoning: 1 of 5 agents sends a boosted (x10) or a sign-flipped (x10) delta.

Setup (cached-feature model, see edgetune/simulate.py): 5 agents, iid shards of a seeded
6,000-example sample of VADER's training split (1,200 each), 10 rounds of 10 local AdamW steps
(lr 2e-3, batch 32), 600 held-out examples, seed 0. "Accuracy" is the mean over the last 3
rounds (one round moves by about 2 points). Caching the features takes about a minute on 2
cores; each run then takes about a second.

Asserted (the issue's bar), with what was measured here at seed 0 (in brackets, seeds 0-3):

- plain FedAvg under the x10 sign flip loses at least 5 points (45.6 [31.6-45.9]);
- plain FedAvg under the x10 boost becomes erratic: its worst round from round 3 on is at
  least 10 points below the clean run's worst;
- against both attacks, median, trimmed_mean (beta 0.2), multi-Krum (f=1, m=3) and clip
  (bound 0.5, about the honest update norm) stay within 2 points of their own clean run.
  Drops in points, flip / boost: median 0.1 / 0.2 [at most 0.9], trimmed mean 0.3 / 0.4 [1.3],
  Krum -0.9 / -0.9 [0.6], clip 0.7 / -0.1 [1.7].

With 240 examples per agent instead (a 1,200-example sample) the honest agents overfit their
shards in different directions and the coordinate-wise median, trimmed mean and clipping lose
about 4 points to the flip: each coordinate's median moves to a neighbouring honest value that
is itself far off, and a clipped flip still pulls with the full bound. bench/poisoning.py shows
the table with every training example.
"""

from __future__ import annotations

import statistics
from functools import cache

import pytest

from edgetune.simulate import SimConfig, run_simulation

BASE = dict(agents=5, rounds=10, partition="iid", train_limit=6000, eval_limit=600, local_steps=10, lr=2e-3, seed=0)
ROBUST = {
    "median": {},
    "trimmed_mean": {"beta": 0.2},  # floor(0.2 * 5) = 1 value trimmed at each end
    "krum": {"f": 1, "m": 3},
    "clip": {"bound": 0.5},
}
STRATEGIES = {"fedavg": {}, **ROBUST}


@cache
def run(strategy: str, attack: str | None) -> tuple[float, float, list[str], float]:
    """(mean accuracy of the last 3 rounds, initial accuracy, attackers, worst accuracy from round 3 on)"""
    cfg = SimConfig(strategy=strategy, strategy_options=dict(STRATEGIES[strategy]), attackers=1 if attack else 0,
                    attack=attack, attack_scale=10.0, flip_scale=10.0, **BASE)
    res = run_simulation(cfg)
    acc = res.accuracies
    return statistics.mean(acc[-3:]), acc[0], res.attackers, min(acc[3:])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_clean_runs_learn(strategy):
    acc, initial, attackers, _ = run(strategy, None)
    assert attackers == []
    assert acc >= initial + 0.20, f"{strategy} clean: {acc:.4f} from {initial:.4f}"


def test_fedavg_drops_visibly_under_the_sign_flip():
    clean = run("fedavg", None)[0]
    attacked, _, attackers, _ = run("fedavg", "flip")
    assert len(attackers) == 1
    assert attacked <= clean - 0.05, f"fedavg flip: {attacked:.4f} vs clean {clean:.4f}"


def test_fedavg_is_thrown_off_by_the_boost():
    clean_worst = run("fedavg", None)[3]
    _, _, attackers, worst = run("fedavg", "scale")
    assert len(attackers) == 1
    assert worst <= clean_worst - 0.10, f"fedavg scale: worst round {worst:.4f} vs clean {clean_worst:.4f}"


@pytest.mark.parametrize("strategy", list(ROBUST))
def test_robust_strategies_hold_against_scaled_updates(strategy):
    clean = run(strategy, None)[0]
    attacked = run(strategy, "scale")[0]
    assert abs(attacked - clean) <= 0.02, f"{strategy} scale: {attacked:.4f} vs clean {clean:.4f}"
    assert attacked >= run("fedavg", "scale")[0] + 0.05


@pytest.mark.parametrize("strategy", list(ROBUST))
def test_robust_strategies_hold_against_sign_flips(strategy):
    clean, attacked = run(strategy, None)[0], run(strategy, "flip")[0]
    assert abs(attacked - clean) <= 0.02, f"{strategy} flip: {attacked:.4f} vs clean {clean:.4f}"
    assert attacked >= run("fedavg", "flip")[0] + 0.15
