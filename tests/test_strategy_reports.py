"""Each strategy's report() / diagnostics() after an aggregate, and the one update validator."""

from __future__ import annotations

import math

import pytest
import torch

import aggregator.strategies.base as strategies_base
from aggregator.strategies import (
    STRATEGIES,
    ClientUpdate,
    InvalidUpdate,
    check_update,
    make_strategy,
    report,
)
from models.adapters import AdapterMismatch, check_adapter_state
from models.classifier import AdapterMismatch as ClassifierAdapterMismatch
from models.classifier import check_adapter_state as classifier_check

F64 = torch.float64
CUR = {"w": torch.zeros(2, dtype=F64)}


def ups():
    # deltas: a (3, 4) norm 5; b, c, d small and close together; e far away
    vals = {"a": (3.0, 4.0), "b": (0.1, 0.0), "c": (0.0, 0.1), "d": (0.1, 0.1), "e": (-9.0, 9.0)}
    return [ClientUpdate(k, {"w": torch.tensor(v, dtype=F64)}, 2) for k, v in vals.items()]


@pytest.mark.parametrize("name,options", [("fedavg", {}), ("fedadam", {}), ("fedyogi", {}), ("median", {}),
                                          ("trimmed_mean", {"beta": 0.2})])
def test_plain_strategies_report_nothing(name, options):
    s = make_strategy(name, **options)
    s.aggregate(CUR, ups())
    assert s.report() == {} and report(s) == {} and s.diagnostics() == {}


def test_krum_reports_its_selection():
    s = make_strategy("krum", f=1, m=2)
    s.aggregate(CUR, ups())
    want = {"krum_selected": ["d", "b"]}  # the two with the closest neighbours
    assert s.report() == want and report(s) == want and s.diagnostics() == want


def test_clip_reports_the_clipped_agents_and_its_inner_strategys_report():
    s = make_strategy("clip", bound=1.0, inner="krum", inner_options={"f": 1, "m": 2})
    s.aggregate(CUR, ups())
    assert s.report() == {"clipped": ["a", "e"], "krum_selected": ["d", "b"]}
    d = s.diagnostics()
    assert d["clipped"] == ["a", "e"]
    assert d["unclipped_norms"] == pytest.approx({"a": 5.0, "b": 0.1, "c": 0.1, "d": math.hypot(0.1, 0.1),
                                                  "e": math.hypot(9.0, 9.0)})


def test_dp_fedavg_reports_noise_rate_epsilon_and_clipping():
    s = make_strategy("dp_fedavg", clip_norm=1.0, noise_multiplier=1.5, num_agents=10, seed=0, delta=1e-5)
    s.aggregate(CUR, ups())
    r = s.report()
    assert list(r) == ["dp_noise_std", "dp_sample_rate", "dp_epsilon", "dp_delta", "dp_rounds", "dp_clipped"]
    assert r["dp_noise_std"] == pytest.approx(1.5 * 1.0 / 5) and r["dp_sample_rate"] == pytest.approx(0.5)
    assert r["dp_epsilon"] == pytest.approx(s.accountant.epsilon(1e-5)) and 0 < r["dp_epsilon"] < math.inf
    assert (r["dp_delta"], r["dp_rounds"], r["dp_clipped"]) == (1e-5, 1, 2)
    assert report(s) == r
    d = s.diagnostics()
    assert d["unclipped_norms"] == pytest.approx([5.0, 0.1, 0.1, math.hypot(0.1, 0.1), math.hypot(9.0, 9.0)])
    assert d["clip_norms"] == pytest.approx([1.0, 0.1, 0.1, math.hypot(0.1, 0.1), 1.0])
    assert d["noise_std"] == r["dp_noise_std"] and d["sample_rate"] == r["dp_sample_rate"]
    assert (d["noise_multiplier"], d["clip_norm"], d["delta"], d["epsilon"]) == (1.5, 1.0, 1e-5, r["dp_epsilon"])


def test_dp_fedavg_reports_without_delta_or_noise():
    s = make_strategy("dp_fedavg", clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.5, inner="fedadam")
    assert s.report() == {"dp_delta": None, "dp_rounds": 0, "dp_clipped": 0}  # before any round
    s.aggregate(CUR, ups())
    assert "dp_epsilon" not in s.report() and s.diagnostics()["epsilon"] is None
    s = make_strategy("dp_fedavg", clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.5, delta=1e-5)
    s.aggregate(CUR, ups())
    assert s.report()["dp_epsilon"] == math.inf and s.diagnostics()["epsilon"] is None  # no noise: no privacy


def test_every_registered_strategy_reports():
    for name in STRATEGIES:
        opts = {"clip": {"bound": 1.0}, "dp_fedavg": {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1}}
        s = make_strategy(name, **opts.get(name, {}))
        assert isinstance(s.report(), dict) and isinstance(s.diagnostics(), dict)


# -- the one validator -------------------------------------------------------------------------

EXPECTED = {"lora_A": torch.zeros(2, 3), "head": torch.zeros(2)}


@pytest.mark.parametrize("got,num_examples,reason", [
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, 0, "bad_num_examples"),
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, 1.5, "bad_num_examples"),
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, True, "bad_num_examples"),
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, float("nan"), "bad_num_examples"),
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, None, "bad_num_examples"),
    ({"lora_A": torch.ones(2, 3)}, 1, "bad_tensors"),  # missing
    ({"lora_A": torch.ones(2, 3), "head": torch.ones(2), "x": torch.ones(1)}, 1, "bad_tensors"),  # extra
    ({"lora_A": torch.ones(3, 2), "head": torch.ones(2)}, 1, "bad_tensors"),  # shape
    ({"lora_A": torch.ones(2, 3).double(), "head": torch.ones(2)}, 1, "bad_tensors"),  # dtype
    ({"lora_A": torch.full((2, 3), float("nan")), "head": torch.ones(2)}, 1, "non_finite"),
    ({"lora_A": torch.ones(2, 3), "head": torch.tensor([1.0, float("-inf")])}, 1, "non_finite"),
])
def test_validator_rejects_each_bad_case_with_its_reason(got, num_examples, reason):
    with pytest.raises(InvalidUpdate) as e:
        check_adapter_state(EXPECTED, got, num_examples=num_examples, agent_id="a")
    assert e.value.reason == reason and e.value.agent_id == "a" and str(e.value).startswith("update from a: ")
    with pytest.raises(InvalidUpdate) as e:  # the same check through a strategy's entry point
        check_update(EXPECTED, ClientUpdate("a", got, num_examples))
    assert e.value.reason == reason


def test_validator_accepts_a_good_state_and_is_one_function_and_one_error():
    check_adapter_state(EXPECTED, {"lora_A": torch.ones(2, 3), "head": torch.ones(2)}, num_examples=3)
    check_adapter_state(None, {"anything": torch.ones(4)}, num_examples=1)  # no reference: values only
    with pytest.raises(InvalidUpdate) as e:
        check_adapter_state(None, {"anything": torch.tensor([float("nan")])})
    assert e.value.reason == "non_finite" and e.value.agent_id is None and str(e.value).startswith("tensor anything")
    assert AdapterMismatch is InvalidUpdate and ClassifierAdapterMismatch is InvalidUpdate
    assert classifier_check is check_adapter_state and issubclass(InvalidUpdate, ValueError)


def test_strategies_trust_updates_checked_at_the_boundary(monkeypatch):
    calls = []
    real = strategies_base.check_adapter_state
    monkeypatch.setattr(strategies_base, "check_adapter_state", lambda *a, **k: calls.append(k["agent_id"]) or real(*a, **k))
    one = {"w": torch.ones(2, dtype=F64)}
    updates = [ClientUpdate("a", one, 1, checked=True), ClientUpdate("b", one, 1), ClientUpdate("c", one, 1)]
    for name in ("fedavg", "fedadam", "median", "krum", "clip", "dp_fedavg"):
        opts = {"clip": {"bound": 1.0}, "dp_fedavg": {"clip_norm": 1.0, "noise_multiplier": 0.0, "sampling_rate": 1.0}}
        calls.clear()
        make_strategy(name, **opts.get(name, {})).aggregate(CUR, updates)
        # a (checked) is not checked again; the wrappers' inner strategies check what they are handed
        want = {"clip": ["a", "b", "b", "c", "c"], "dp_fedavg": ["b", "c", "dp-aggregate"]}.get(name, ["b", "c"])
        assert sorted(calls) == want, name
