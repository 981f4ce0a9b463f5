"""DP-FedAvg: clipping, unweighted mean, noise scale (checked statistically), and the accountant."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aggregator.strategies import ClientUpdate, DPFedAvg, FedAdam, PrivacyAccountant, StrategyOptionsError, make_strategy

F64 = torch.float64


def T(*xs):
    return torch.tensor(xs, dtype=F64)


def test_clips_each_delta_and_averages_unweighted():
    cur = {"w": T(1.0, 1.0)}
    ups = [ClientUpdate("a", {"w": T(4.0, 5.0)}, 1000),  # delta (3, 4), norm 5 -> (0.6, 0.8)
           ClientUpdate("b", {"w": T(1.3, 1.4)}, 1)]  # delta (0.3, 0.4), norm 0.5
    dp = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0, num_agents=10, seed=0)
    out = dp.aggregate(cur, ups)
    # uniform weights despite 1000 vs 1 examples: (0.6 + 0.3) / 2, (0.8 + 0.4) / 2
    assert torch.allclose(out["w"], T(1.45, 1.6), atol=1e-12)
    assert dp.last_clip_norms == pytest.approx([1.0, 0.5])
    assert dp.last_unclipped_norms == pytest.approx([5.0, 0.5])
    assert dp.noise_std == 0.0 and dp.last_sample_rate == pytest.approx(0.2)
    assert dp.epsilon(1e-5) == math.inf  # no noise, no privacy


def _noise_of(dp, n_agents, size=200_000, parts=8):
    """One round where every client sends the delta (3, 4, 0, ...), norm 5 > the clip; return
    the noise = output - current - the clipped delta. The state is `parts` tensors (each small
    enough that torch keeps its ops on one thread)."""
    per = size // parts
    cur = {f"t{i}": torch.full((per,), float(i), dtype=F64) for i in range(parts)}
    delta = {k: torch.zeros(per, dtype=F64) for k in cur}
    delta["t0"][0], delta["t1"][0] = 3.0, 4.0
    ups = [ClientUpdate(f"c{i}", {k: cur[k] + delta[k] for k in cur}, 1 + i) for i in range(n_agents)]
    out = dp.aggregate(cur, ups)
    scale = dp.options.clip_norm / 5.0
    return torch.cat([out[k] - cur[k] - delta[k] * scale for k in cur])


@pytest.mark.parametrize("n_agents", [2, 8])
def test_noise_std_is_multiplier_times_clip_over_agents(n_agents):
    z, c, size = 1.3, 0.7, 200_000
    dp = DPFedAvg(clip_norm=c, noise_multiplier=z, sampling_rate=0.1, seed=1234)
    noise = _noise_of(dp, n_agents, size)
    want = z * c / n_agents
    assert dp.noise_std == pytest.approx(want)
    # sample std of 200k normals: relative standard error 1/sqrt(2N) = 0.16%; allow 1%
    assert float(noise.std()) == pytest.approx(want, rel=0.01)
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(size)
    # and it is the normal distribution, not e.g. uniform: about 68.3% within one std
    assert float((noise.abs() < want).to(F64).mean()) == pytest.approx(0.6827, abs=0.005)


def test_noise_reproducible_with_seed_and_differs_without():
    run = lambda seed: _noise_of(DPFedAvg(clip_norm=1, noise_multiplier=1, sampling_rate=0.5, seed=seed), 3, 1000, 2)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(None), run(None))


def test_inner_server_optimiser_gets_the_noisy_mean_as_pseudo_gradient():
    cur = {"w": T(0.0, 0.0)}
    ups = [ClientUpdate("a", {"w": T(3.0, 4.0)}, 5), ClientUpdate("b", {"w": T(0.0, 0.2)}, 1)]
    dp = make_strategy("dp_fedavg", inner="fedadam", inner_options={"eta": 0.5}, clip_norm=1.0,
                       noise_multiplier=0.0, num_agents=2)
    out = dp.aggregate(cur, ups)
    ref = FedAdam(eta=0.5).aggregate(cur, [ClientUpdate("x", {"w": T(0.3, 0.5)}, 1)])  # ((0.6+0)/2, (0.8+0.2)/2)
    assert torch.allclose(out["w"], ref["w"], atol=1e-12)
    assert dp.inner.step == 1


def test_options_validated():
    with pytest.raises(StrategyOptionsError, match="exactly one of sampling_rate"):
        DPFedAvg(clip_norm=1, noise_multiplier=1)
    with pytest.raises(StrategyOptionsError, match="exactly one of sampling_rate"):
        DPFedAvg(clip_norm=1, noise_multiplier=1, sampling_rate=0.1, num_agents=10)
    with pytest.raises(StrategyOptionsError, match="clip_norm"):
        DPFedAvg(clip_norm=0, noise_multiplier=1, num_agents=10)
    with pytest.raises(StrategyOptionsError, match="sampling_rate"):
        DPFedAvg(clip_norm=1, noise_multiplier=1, sampling_rate=1.5)
    with pytest.raises(StrategyOptionsError, match="server optimiser"):
        DPFedAvg("krum", clip_norm=1, noise_multiplier=1, num_agents=10)
    dp = DPFedAvg(clip_norm=1, noise_multiplier=1, num_agents=2, seed=0)
    ups = [ClientUpdate(str(i), {"w": T(1.0)}, 1) for i in range(3)]
    with pytest.raises(ValueError, match="num_agents"):
        dp.aggregate({"w": T(0.0)}, ups)
    assert dp.rounds == 0  # refused: nothing accounted


def test_epsilon_reported_each_round_and_grows():
    dp = DPFedAvg(clip_norm=1, noise_multiplier=1.1, num_agents=100, seed=0, delta=1e-5)
    cur = {"w": torch.zeros(3, dtype=F64)}
    eps = []
    for r in range(3):
        dp.aggregate(cur, [ClientUpdate(f"c{i}", {"w": torch.ones(3, dtype=F64)}, 1) for i in range(4)])
        eps.append(dp.last_epsilon)
    assert dp.rounds == 3 and dp.last_sample_rate == pytest.approx(0.04)
    assert 0 < eps[0] < eps[1] < eps[2] < math.inf
    ref = PrivacyAccountant()
    ref.step(noise_multiplier=1.1, sample_rate=0.04, steps=3)
    assert eps[2] == pytest.approx(ref.epsilon(1e-5))


def test_state_dict_round_trip():
    dp = DPFedAvg("fedyogi", clip_norm=1, noise_multiplier=1.0, sampling_rate=0.1, seed=0)
    cur = {"w": torch.zeros(3, dtype=F64)}
    for _ in range(2):
        cur = dp.aggregate(cur, [ClientUpdate("a", {"w": cur["w"] + 1}, 1)])
    state = json.loads(json.dumps(dp.state_dict()))
    back = DPFedAvg("fedyogi", clip_norm=1, noise_multiplier=1.0, sampling_rate=0.1)
    back.load_state_dict(state)
    assert back.epsilon(1e-5) == dp.epsilon(1e-5) and back.rounds == 2 and back.inner.step == 2


# -- the accountant ------------------------------------------------------------------------------


def test_accountant_matches_opacus_published_value():
    # opacus tests/accountants_test.py: sigma 1.5, q 0.04, 90 epochs (2250 steps), delta 1e-5
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04))
    assert acc.epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-9)
    assert acc.history == [(1.5, 0.04, 2250)]


ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _convert(rdp_of_alpha, delta, alphas):
    # RDP -> (eps, delta): eps = rdp - (log delta + log a)/(a - 1) + log((a - 1)/a), best a
    return min(rdp_of_alpha(a) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in alphas)


def test_accountant_full_participation_is_the_gaussian_mechanism():
    # q = 1: RDP of the Gaussian mechanism, alpha / (2 sigma^2) per round (Mironov 2017)
    acc = PrivacyAccountant()
    sigma, rounds, delta = 2.0, 50, 1e-6
    for _ in range(rounds):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    want = _convert(lambda a: rounds * a / (2 * sigma**2), delta, ALPHAS)
    assert acc.epsilon(delta) == pytest.approx(want, rel=1e-9)


def test_accountant_subsampled_integer_order_by_hand():
    # alpha = 2: A = (1-q)^2 + 2q(1-q) + q^2 exp(1/sigma^2); RDP = T log A (Mironov et al. 2019)
    q, sigma, rounds, delta = 0.1, 0.8, 20, 1e-5
    acc = PrivacyAccountant(orders=[2])
    acc.step(noise_multiplier=sigma, sample_rate=q, steps=rounds)
    log_a = math.log((1 - q) ** 2 + 2 * q * (1 - q) + q**2 * math.exp(1 / sigma**2))
    assert acc.epsilon(delta) == pytest.approx(_convert(lambda a: rounds * log_a, delta, [2]), rel=1e-9)


def test_accountant_composes_mixed_rounds_and_round_trips():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.step(noise_multiplier=2.0, sample_rate=0.2)
    assert acc.history == [(1.0, 0.1, 6), (2.0, 0.2, 1)] and acc.rounds == 7
    back = PrivacyAccountant()
    back.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert back.epsilon(1e-5) == acc.epsilon(1e-5)
    assert PrivacyAccountant().epsilon(1e-5) == 0.0
    with pytest.raises(ValueError):
        acc.epsilon(0.0)
    with pytest.raises(ValueError):
        back.load_state_dict({"history": [[1.0, 2.0, 1]]})


@pytest.mark.slow
def test_accountant_agrees_with_opacus_when_installed():
    # cross-check against opacus (a dev dependency; `pip install opacus==1.6.0` if missing)
    import opacus.accountants as opacus
    for z, q, steps in [(0.5, 0.01, 1000), (1.1, 0.004, 15000), (3.0, 0.3, 10), (0.8, 0.99, 5)]:
        ref = opacus.RDPAccountant()
        ref.history = [(z, q, steps)]
        ours = PrivacyAccountant()
        ours.step(noise_multiplier=z, sample_rate=q, steps=steps)
        assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
