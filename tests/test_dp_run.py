"""A DP-FedAvg run in the simulator: clipping bound, noise scale and epsilon, checked from outside.

20 agents (60 examples each, cached-feature model), half of them per round, 8 rounds,
clip_norm 0.2 (below most honest update norms, so clipping is exercised), noise
multiplier 1.0, delta 1e-5. Everything is recomputed from the run's trace (the global each
round started from, every update and the new global) and a fresh PrivacyAccountant.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from aggregator.strategies import (DEFAULT_ORDERS, PrivacyAccountant, clip_by_norm, compute_rdp, delta_of,
                                  get_privacy_spent, global_norm)
from edgetune.simulate import SimConfig, run_simulation

C, Z, DELTA, N_AGENTS = 0.2, 1.0, 1e-5, 20


@pytest.fixture(scope="module")
def dp_run():
    cfg = SimConfig(agents=N_AGENTS, participation=0.5, rounds=8, train_limit=1200, eval_limit=600, local_steps=10,
                    lr=2e-3, strategy="dp_fedavg", strategy_options={"clip_norm": C, "noise_multiplier": Z, "delta": DELTA},
                    keep_trace=True, seed=0)
    return run_simulation(cfg)


def test_every_clipped_update_is_within_the_bound(dp_run):
    clipped_somewhere = 0
    for rec, row in zip(dp_run.trace, dp_run.rows[1:]):
        ups = sorted(rec["updates"], key=lambda u: u.agent_id)  # the order they were aggregated in
        raw = [global_norm(delta_of(rec["global"], u.tensors)) for u in ups]
        assert row["unclipped_norms"] == pytest.approx(raw, rel=1e-9)
        assert row["clip_norms"] == pytest.approx([min(r, C) for r in raw], rel=1e-9)
        for u in ups:  # clip it ourselves, too
            d, _ = clip_by_norm(delta_of(rec["global"], u.tensors), C)
            assert global_norm(d) <= C * (1 + 1e-12)
        assert all(n <= C * (1 + 1e-12) for n in row["clip_norms"])
        clipped_somewhere += sum(r > C for r in raw)
    assert clipped_somewhere >= len(dp_run.trace)  # the bound bit, not a no-op


def test_noise_has_the_stated_scale(dp_run):
    for rec, row in zip(dp_run.trace, dp_run.rows[1:]):
        ups = rec["updates"]
        n = len(ups)
        mean = {}
        for u in ups:
            d, _ = clip_by_norm(delta_of(rec["global"], u.tensors), C)
            for k, t in d.items():
                mean[k] = mean.get(k, 0) + t / n
        noise = torch.cat([(rec["new"][k].double() - rec["global"][k].double() - mean[k]).reshape(-1) for k in mean])
        want = Z * C / n
        assert row["noise_std"] == pytest.approx(want)
        assert float(noise.std()) == pytest.approx(want, rel=0.05)  # ~7,000 coordinates
        assert abs(float(noise.mean())) < 4 * want / math.sqrt(noise.numel())


def test_reported_epsilon_matches_an_independent_accountant(dp_run):
    acc = PrivacyAccountant()
    steps = []
    for row in dp_run.rows[1:]:
        q = len(row["selected"]) / N_AGENTS
        assert q == 0.5 and row["sample_rate"] == pytest.approx(q)
        acc.step(noise_multiplier=Z, sample_rate=q)
        steps.append(q)
        assert row["epsilon"] == pytest.approx(acc.epsilon(DELTA), rel=1e-12)
        # and straight from the RDP formulas, without the accountant class
        rdp = compute_rdp(q=q, noise_multiplier=Z, steps=len(steps), orders=DEFAULT_ORDERS)
        assert row["epsilon"] == pytest.approx(get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=DELTA)[0], rel=1e-12)
    eps = [r["epsilon"] for r in dp_run.rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0 and math.isfinite(eps[-1])


def test_dp_run_still_learns(dp_run):
    acc = dp_run.accuracies
    assert statistics.mean(acc[-3:]) >= acc[0] + 0.08, acc
