"""Aggregation strategies against results computed by hand on small tensors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from aggregator.strategies import (
    STRATEGIES,
    Clip,
    ClientUpdate,
    FedAdam,
    FedAvg,
    FedYogi,
    InvalidUpdate,
    Krum,
    Median,
    StrategyOptionsError,
    TrimmedMean,
    coordinate_median,
    fedavg,
    krum_scores,
    make_strategy,
)
from models.train import proximal_term

F64 = torch.float64


def T(*xs, dtype=F64):
    return torch.tensor(xs, dtype=dtype)


def U(agent, n=1, **tensors):
    return ClientUpdate(agent, tensors, n)


# -- FedAvg --------------------------------------------------------------------------------------


def test_fedavg_weighted_by_examples_and_streams():
    ups = [U("a", 1, w=T(0.0, 4.0)), U("b", 3, w=T(4.0, 0.0))]
    out = FedAvg().aggregate({"w": T(9.0, 9.0)}, iter(ups))  # a one-shot iterator is enough
    assert torch.allclose(out["w"], T(3.0, 1.0))
    assert torch.equal(fedavg(ups)["w"], out["w"])
    # the legacy call with an empty current still works
    assert torch.allclose(FedAvg().aggregate({}, ups)["w"], T(3.0, 1.0))


def test_fedavg_keeps_dtype_and_refuses_bad_updates():
    cur = {"w": torch.zeros(2)}
    out = FedAvg().aggregate(cur, [U("a", 2, w=torch.ones(2))])
    assert out["w"].dtype == torch.float32
    with pytest.raises(InvalidUpdate) as e:
        FedAvg().aggregate(cur, [U("a", 1, w=torch.tensor([1.0, float("nan")]))])
    assert e.value.reason == "non_finite" and e.value.agent_id == "a"
    with pytest.raises(InvalidUpdate, match="shape"):
        FedAvg().aggregate(cur, [U("a", 1, w=torch.ones(3))])
    with pytest.raises(InvalidUpdate, match="names"):
        FedAvg().aggregate(cur, [U("a", 1, v=torch.ones(2))])
    with pytest.raises(InvalidUpdate, match="num_examples"):
        FedAvg().aggregate(cur, [U("a", 0, w=torch.ones(2))])


# -- FedAdam / FedYogi ---------------------------------------------------------------------------
# x0 = [1, -2]; round 1: a (n=1) -> [2, -2] (delta [1, 0]), b (n=3) -> [1, 0] (delta [0, 2]):
# g1 = (1*[1, 0] + 3*[0, 2]) / 4 = [0.25, 1.5]. Round 2: one client with delta g2 = [-0.5, 0.1].
ETA, B1, B2, TAU = 0.1, 0.9, 0.99, 0.01
G1 = (0.25, 1.5)
G2 = (-0.5, 0.1)


def _round1(x):
    return [U("a", 1, w=x + T(1.0, 0.0)), U("b", 3, w=x + T(0.0, 2.0))]


def _hand(kind):
    """Both steps, one coordinate at a time, with scalar arithmetic only."""
    x = [1.0, -2.0]
    v0 = TAU**2
    out1, out2 = [], []
    for i in range(2):
        m1 = (1 - B1) * G1[i]
        if kind == "adam":
            v1 = B2 * v0 + (1 - B2) * G1[i] ** 2
        else:
            v1 = v0 - (1 - B2) * G1[i] ** 2 * math.copysign(1.0, v0 - G1[i] ** 2)
        x1 = x[i] + ETA * m1 / (math.sqrt(v1) + TAU)
        m2 = B1 * m1 + (1 - B1) * G2[i]
        if kind == "adam":
            v2 = B2 * v1 + (1 - B2) * G2[i] ** 2
        else:
            v2 = v1 - (1 - B2) * G2[i] ** 2 * math.copysign(1.0, v1 - G2[i] ** 2)
        out1.append(x1)
        out2.append(x1 + ETA * m2 / (math.sqrt(v2) + TAU))
    return out1, out2


@pytest.mark.parametrize("cls,kind", [(FedAdam, "adam"), (FedYogi, "yogi")])
def test_fedopt_one_and_two_steps_by_hand(cls, kind):
    s = cls(eta=ETA, b1=B1, b2=B2, tau=TAU)
    x0 = {"w": T(1.0, -2.0)}
    x1 = s.aggregate(x0, _round1(x0["w"]))
    want1, want2 = _hand(kind)
    assert torch.allclose(x1["w"], T(*want1), rtol=0, atol=1e-12)
    assert torch.allclose(s.m["w"], T(0.025, 0.15), atol=1e-15)
    x2 = s.aggregate(x1, [U("c", 2, w=x1["w"] + T(*G2))])
    assert torch.allclose(x2["w"], T(*want2), rtol=0, atol=1e-12)
    assert s.step == 2


def test_yogi_second_moment_sign_rule():
    # coordinate 1: v1 = 1e-4 + 0.01 * 1.5^2 = 0.0226 > g2^2 = 0.01, so Yogi *decreases* v by
    # 0.01 * 0.01 while Adam mixes: 0.99 * v1 + 0.01 * 0.01; coordinate 0: v1 < g2^2 = 0.25,
    # so Yogi increases v by 0.01 * 0.25
    ya, ad = FedYogi(eta=ETA, b1=B1, b2=B2, tau=TAU), FedAdam(eta=ETA, b1=B1, b2=B2, tau=TAU)
    for s in (ya, ad):
        x0 = {"w": T(1.0, -2.0)}
        x1 = s.aggregate(x0, _round1(x0["w"]))
        s.aggregate(x1, [U("c", 1, w=x1["w"] + T(*G2))])
    yv1 = (1e-4 + 0.01 * 0.0625, 1e-4 + 0.01 * 2.25)
    assert torch.allclose(ya.v["w"], T(yv1[0] + 0.01 * 0.25, yv1[1] - 0.01 * 0.01), rtol=0, atol=1e-12)
    av1 = (0.99e-4 + 0.01 * 0.0625, 0.99e-4 + 0.01 * 2.25)
    assert torch.allclose(ad.v["w"], T(0.99 * av1[0] + 0.01 * 0.25, 0.99 * av1[1] + 0.01 * 0.01), rtol=0, atol=1e-12)


def test_fedopt_uniform_weights_option():
    s = FedAdam(eta=1.0, b1=0.0, b2=0.0, tau=1e-9, weighted=False)
    x0 = {"w": T(0.0, 0.0)}
    out = s.aggregate(x0, _round1(x0["w"]))
    # g = ([1, 0] + [0, 2]) / 2 = [0.5, 1]; with b1 = b2 = 0: step = g / |g| = sign(g)
    assert torch.allclose(out["w"], T(1.0, 1.0), atol=1e-6)


def test_fedopt_state_dict_round_trip_is_json_and_resumes_exactly():
    x0 = {"w": T(1.0, -2.0), "b": torch.tensor([[0.5]], dtype=F64)}
    ups = [U("a", 1, w=x0["w"] + T(1.0, 0.0), b=x0["b"] + 1), U("b", 3, w=x0["w"] + T(0.0, 2.0), b=x0["b"])]
    s = FedYogi(eta=ETA, tau=TAU)
    x1 = s.aggregate(x0, ups)
    state = json.loads(json.dumps(s.state_dict()))
    r = FedYogi(eta=ETA, tau=TAU)
    r.load_state_dict(state)
    nxt = [U("c", 2, w=x1["w"] + T(*G2), b=x1["b"] - 1)]
    a, b = s.aggregate(x1, nxt), r.aggregate(x1, nxt)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="fedyogi"):
        FedAdam().load_state_dict(state)


def test_fedopt_refusal_leaves_state_unchanged():
    s = FedAdam()
    x0 = {"w": T(1.0, -2.0)}
    with pytest.raises(InvalidUpdate):
        s.aggregate(x0, [U("a", 1, w=x0["w"] + 1), U("b", 1, w=T(float("inf"), 0.0))])
    assert s.step == 0 and not s.m
    with pytest.raises(ValueError, match="no updates"):
        s.aggregate(x0, [])
    s.aggregate(x0, [U("a", 1, w=x0["w"] + 1)])
    with pytest.raises(ValueError, match="reset"):
        s.aggregate({"other": T(1.0)}, [U("a", 1, other=T(2.0))])
    assert s.step == 1


# -- median / trimmed mean -----------------------------------------------------------------------


def test_median_odd_and_even_ignores_weights():
    ups = [U("a", 1, w=T(1.0, 10.0, 3.0)), U("b", 1000, w=T(2.0, -5.0, 3.0)), U("c", 1, w=T(100.0, 0.0, 3.0))]
    assert torch.equal(Median().aggregate({}, ups)["w"], T(2.0, 0.0, 3.0))
    ups.append(U("d", 1, w=T(0.0, 1.0, 4.0)))
    # sorted columns: (0,1,2,100) (-5,0,1,10) (3,3,3,4) -> middle pairs averaged
    assert torch.equal(Median().aggregate({"w": torch.zeros(3, dtype=F64)}, ups)["w"], T(1.5, 0.5, 3.0))


def test_median_of_states_equals_current_plus_median_of_deltas():
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(4, 3, generator=g, dtype=F64)
    deltas = [torch.randn(4, 3, generator=g, dtype=F64) for _ in range(5)]
    of_states = coordinate_median([{"w": cur + d} for d in deltas])["w"]
    of_deltas = coordinate_median([{"w": d} for d in deltas])["w"]
    assert torch.allclose(of_states, cur + of_deltas, atol=1e-12)


def test_median_keeps_dtype_and_shape():
    out = Median().aggregate({}, [U(str(i), 1, w=torch.full((2, 2), float(i))) for i in range(3)])
    assert out["w"].dtype == torch.float32 and out["w"].shape == (2, 2) and torch.all(out["w"] == 1.0)


@pytest.mark.parametrize("beta,want", [(0.0, 22.0), (0.1, 22.0), (0.2, 3.0), (0.39, 3.0), (0.4, 3.0)])
def test_trimmed_mean_by_hand(beta, want):
    # n = 5, values 1,2,3,4,100 (given out of order); k = floor(beta * 5) dropped at each end
    vals = [4.0, 100.0, 1.0, 3.0, 2.0]
    out = TrimmedMean(beta=beta).aggregate({}, [U(str(i), 1, w=T(v, -v)) for i, v in enumerate(vals)])
    assert torch.allclose(out["w"], T(want, -want))


def test_trimmed_mean_options_validated():
    with pytest.raises(StrategyOptionsError, match="beta"):
        TrimmedMean(beta=0.5)
    with pytest.raises(StrategyOptionsError, match="beta"):
        make_strategy("trimmed_mean", beta=-0.1)


# -- Krum ----------------------------------------------------------------------------------------
# points a=(0,0) b=(1,0) c=(0,2) d=(1,1) e=(10,10); n=5, f=1: sum of the 2 nearest squared
# distances: a: 1+2=3, b: 1+1=2, c: 2+4=6, d: 1+2=3, e: 162+164=326
KRUM_POINTS = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 2.0), "d": (1.0, 1.0), "e": (10.0, 10.0)}


def _krum_updates():
    return [U(k, 1 if k != "e" else 10_000, w=T(*v)) for k, v in KRUM_POINTS.items()]


def test_krum_scores_by_hand():
    assert krum_scores([u.tensors for u in _krum_updates()], f=1) == [3.0, 2.0, 6.0, 3.0, 326.0]


def test_krum_selects_lowest_score():
    s = Krum(f=1)
    out = s.aggregate({"w": T(0.0, 0.0)}, _krum_updates())
    assert s.last_selected == ["b"]
    assert torch.equal(out["w"], T(1.0, 0.0))


def test_multi_krum_averages_m_best_uniformly():
    s = make_strategy("krum", f=1, m=3)
    out = s.aggregate({}, _krum_updates())
    assert s.last_selected == ["b", "a", "d"]  # a and d tie at 3: lower index first
    assert torch.allclose(out["w"], T(2 / 3, 1 / 3))


def test_krum_selection_does_not_depend_on_order():
    ups = _krum_updates()
    random.Random(3).shuffle(ups)
    s = Krum(f=1, m=2)
    s.aggregate({}, ups)
    assert set(s.last_selected) in ({"b", "a"}, {"b", "d"})
    assert "e" not in s.last_selected and s.last_scores["e"] == 326.0


def test_krum_needs_enough_updates():
    with pytest.raises(ValueError, match="2f\\+3 = 7"):
        Krum(f=2).aggregate({}, _krum_updates())
    with pytest.raises(ValueError, match="m <= n - f"):
        Krum(f=1, m=5).aggregate({}, _krum_updates())
    with pytest.raises(StrategyOptionsError, match="m"):
        Krum(m=0)


# -- clipping wrapper ----------------------------------------------------------------------------


def test_clip_bounds_each_delta_then_inner():
    cur = {"x": T(1.0), "y": T(1.0)}
    ups = [U("a", 1, x=T(4.0), y=T(5.0)),  # delta (3, 4) over two tensors: norm 5 -> (0.6, 0.8)
           U("b", 1, x=T(1.3), y=T(1.4))]  # delta (0.3, 0.4): norm 0.5, untouched
    s = Clip(bound=1.0)
    out = s.aggregate(cur, ups)
    assert torch.allclose(out["x"], T(1.45)) and torch.allclose(out["y"], T(1.6))
    assert s.last_norms == pytest.approx({"a": 5.0, "b": 0.5})
    assert s.last_clipped == ["a"]


def test_clip_norms_never_exceed_bound():
    g = torch.Generator().manual_seed(1)
    cur = {"w": torch.zeros(50, dtype=F64)}
    seen = []

    class Spy:
        name = "spy"

        def aggregate(self, current, updates):
            for u in updates:
                seen.append(float((u.tensors["w"] - current["w"]).norm()))
            return dict(current)

    Clip(Spy(), bound=0.7).aggregate(cur, [U(str(i), 1, w=torch.randn(50, generator=g, dtype=F64) * (i + 0.01)) for i in range(6)])
    assert len(seen) == 6 and max(seen) <= 0.7 + 1e-12 and min(seen) < 0.7


def test_clip_wraps_inner_by_name_with_options():
    s = make_strategy("clip", bound=0.5, inner="fedadam", inner_options={"eta": 1.0, "b1": 0.0, "b2": 0.0, "tau": 1e-12})
    out = s.aggregate({"w": T(0.0, 0.0)}, [U("a", 1, w=T(3.0, 4.0))])
    assert torch.allclose(out["w"], T(1.0, 1.0), atol=1e-6)  # Adam with b1=b2=0 steps by sign(g)
    assert json.dumps(s.state_dict())
    with pytest.raises(StrategyOptionsError, match="bound"):
        make_strategy("clip", bound=0)


# -- FedProx -------------------------------------------------------------------------------------


def test_proximal_term_value_and_gradient():
    w = {"w": T(1.0, 2.0).requires_grad_(), "b": T(3.0).requires_grad_()}
    g = {"w": T(0.0, 0.0), "b": T(1.0)}
    p = proximal_term(w, g, mu=0.5)
    assert p.item() == pytest.approx(0.25 * (1 + 4 + 4))
    p.backward()
    assert torch.allclose(w["w"].grad, T(0.5, 1.0)) and torch.allclose(w["b"].grad, T(1.0))
    seq = proximal_term(list(w.values()), list(g.values()), mu=0.5)
    assert seq.item() == pytest.approx(p.item())
    assert proximal_term(w, g, mu=0.0).item() == 0.0
    with pytest.raises(ValueError):
        proximal_term(w, g, mu=-1)
    with pytest.raises(ValueError, match="names"):
        proximal_term(w, {"w": g["w"]}, mu=1)


# -- registry ------------------------------------------------------------------------------------


def test_registry_and_errors():
    assert {"fedavg", "fedadam", "fedyogi", "median", "trimmed_mean", "krum", "clip", "dp_fedavg"} <= set(STRATEGIES)
    for name in ("fedavg", "fedadam", "fedyogi", "median", "trimmed_mean", "krum"):
        assert make_strategy(name).name == name
    assert make_strategy("clip", bound=1).name == "clip"
    assert make_strategy("dp_fedavg", clip_norm=1, noise_multiplier=1, num_agents=10).name == "dp_fedavg"
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")
    with pytest.raises(StrategyOptionsError, match="etta"):
        make_strategy("fedadam", etta=0.1)
    with pytest.raises(StrategyOptionsError, match="b2"):
        make_strategy("fedyogi", b2=1.0)
    with pytest.raises(StrategyOptionsError):
        make_strategy("fedavg", eta=1)
