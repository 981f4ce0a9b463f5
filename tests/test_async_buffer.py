"""FedBuff buffer: staleness weights by hand, exactly-once, refusals that change nothing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from aggregator.async_buffer import AsyncBuffer, DuplicateUpdate, StaleUpdate, polynomial_staleness
from aggregator.strategies import ClientUpdate, InvalidUpdate, StrategyOptionsError

F64 = torch.float64


def T(*xs):
    return torch.tensor(xs, dtype=F64)


def U(agent, w, n=1, base=None, nonce=None):
    return ClientUpdate(agent, {"w": w}, n, base_version=base, nonce=nonce)


def test_staleness_function():
    assert polynomial_staleness(0) == 1.0
    assert polynomial_staleness(3, 0.5) == pytest.approx(0.5)
    assert polynomial_staleness(3, 1.0) == pytest.approx(0.25)
    buf = AsyncBuffer(2, global_state={"w": T(0.0)})
    assert buf.staleness_factor(8) == pytest.approx(1 / 3)
    assert AsyncBuffer(2, "constant", global_state={"w": T(0.0)}).staleness_factor(8) == 1.0


def test_fresh_buffer_is_fedavg_of_deltas_then_staleness_damps():
    buf = AsyncBuffer(2, a=0.5, global_state={"w": T(0.0, 0.0)})
    assert buf.add(U("a", T(1.0, 0.0), n=2, base=0)) is None
    assert buf.pending == 1 and buf.version == 0
    x1 = buf.add(U("b", T(0.0, 3.0), n=1, base=0))
    # all fresh: (2 * [1, 0] + 1 * [0, 3]) / 3
    assert torch.allclose(x1["w"], T(2 / 3, 1.0), atol=1e-15)
    assert buf.version == 1 and buf.pending == 0
    # d trained from v0 (staleness 1, weight 3 / sqrt 2), e from v1 (weight 1)
    assert buf.add(U("d", T(1.0, 1.0), n=3, base=0)) is None  # delta vs v0: [1, 1]
    x2 = buf.add(U("e", x1["w"] + T(2.0, 0.0), n=1, base=1))  # delta vs v1: [2, 0]
    w_d = 3 / math.sqrt(2)
    want = x1["w"] + (w_d * T(1.0, 1.0) + 1.0 * T(2.0, 0.0)) / (3 + 1)
    assert torch.allclose(x2["w"], want, atol=1e-15)
    assert [(a.agent_id, a.staleness) for a in buf.last_applied] == [("d", 1), ("e", 0)]
    assert [a.weight for a in buf.last_applied] == pytest.approx([w_d, 1.0])


def test_constant_weighting_does_not_damp():
    buf = AsyncBuffer(1, "constant", global_state={"w": T(0.0)})
    buf.add(U("a", T(1.0), base=0))  # v1 = 1
    buf.add(U("b", T(1.0), base=1))  # v2 = 1
    x3 = buf.add(U("c", T(4.0), base=0))  # staleness 2, delta vs v0 = 4, undamped
    assert torch.allclose(x3["w"], T(5.0))


def test_server_lr_and_staleness_from_update_field():
    buf = AsyncBuffer(1, a=1.0, server_lr=0.5, global_state={"w": T(0.0)})
    buf.add(U("a", T(2.0), base=0))  # v1 = 0 + 0.5 * 2 = 1
    buf.add(U("b", T(3.0), base=1))  # v2 = 1 + 0.5 * 2 = 2
    # no base_version: staleness 2 taken from the update, so base = v0; s = 1/3
    x3 = buf.add(ClientUpdate("c", {"w": T(6.0)}, 1, staleness=2))
    assert torch.allclose(x3["w"], T(2.0 + 0.5 * 6.0 / 3))


def test_exactly_once_by_nonce():
    buf = AsyncBuffer(3, global_state={"w": T(0.0)})
    buf.add(U("a", T(1.0), base=0, nonce="n-0001"))
    with pytest.raises(DuplicateUpdate) as e:
        buf.add(U("a", T(1.0), base=0, nonce="n-0001"))  # an MQTT QoS 1 redelivery
    assert e.value.reason == "duplicate"
    assert buf.pending == 1
    buf.add(U("a", T(5.0), base=0, nonce="n-0002"))  # same agent, another update: fine
    x1 = buf.add(U("b", T(3.0), base=0, nonce="n-0001"))  # same nonce, other agent: fine
    assert torch.allclose(x1["w"], T(3.0))
    with pytest.raises(DuplicateUpdate):  # still refused after the step
        buf.add(U("a", T(1.0), base=0, nonce="n-0002"))
    assert buf.pending == 0 and buf.version == 1


def test_exactly_once_without_nonce_is_one_per_agent_per_version():
    buf = AsyncBuffer(5, global_state={"w": T(0.0)})
    buf.add(U("a", T(1.0), base=0))
    with pytest.raises(DuplicateUpdate):
        buf.add(U("a", T(2.0), base=0))
    buf.add(U("b", T(1.0), base=0))
    assert buf.pending == 2


def test_every_update_applied_exactly_once_in_a_service_loop():
    # update k moves only coordinate k, by 4 relative to the global it started from; with B = 4,
    # constant weights and n = 1, a step adds sum(deltas) / 4, so coordinate k of the final
    # global is exactly the number of times update k was applied
    n_updates, rng = 60, random.Random(0)
    buf = AsyncBuffer(4, "constant", global_state={"w": torch.zeros(n_updates, dtype=F64)}, max_staleness=100)
    globals_by_version = {0: buf.global_state}
    queue, applied_steps = [], 0
    for k in range(n_updates):
        base = rng.randint(max(0, buf.version - 3), buf.version)
        w = globals_by_version[base]["w"].clone()
        w[k] += 4.0
        u = U(f"agent-{rng.randrange(6)}", w, base=base, nonce=f"nonce-{k:04d}")
        queue += [u, u] if rng.random() < 0.3 else [u]  # some redelivered (QoS 1)
        while queue and (rng.random() < 0.7 or k == n_updates - 1):
            try:
                new = buf.add(queue.pop(0))
            except DuplicateUpdate:
                continue
            if new is not None:
                applied_steps += 1
                globals_by_version[buf.version] = new
    assert buf.flush() is not None or buf.pending == 0
    assert torch.equal(buf.global_state["w"], torch.ones(n_updates, dtype=F64))
    assert applied_steps == n_updates // 4


def test_stale_and_future_updates_refused():
    buf = AsyncBuffer(1, max_staleness=1, global_state={"w": T(0.0)})
    buf.add(U("a", T(1.0), base=0))
    buf.add(U("b", T(2.0), base=1))
    assert buf.version == 2
    with pytest.raises(StaleUpdate, match="2 versions behind"):
        buf.add(U("c", T(9.0), base=0))
    with pytest.raises(StaleUpdate, match="only at v2"):
        buf.add(U("c", T(9.0), base=3))
    assert buf.add(U("c", T(1.0), base=1)) is not None  # staleness 1 is allowed


def test_bad_updates_change_nothing():
    buf = AsyncBuffer(2, global_state={"w": T(1.0, 2.0)})
    with pytest.raises(InvalidUpdate, match="NaN"):
        buf.add(U("a", T(float("nan"), 0.0), base=0))
    with pytest.raises(InvalidUpdate, match="shape"):
        buf.add(U("a", T(1.0), base=0))
    with pytest.raises(InvalidUpdate, match="num_examples"):
        buf.add(U("a", T(1.0, 1.0), n=0, base=0))
    assert buf.pending == 0
    buf.add(U("a", T(2.0, 2.0), base=0))  # the refusals did not burn a's identity
    assert buf.pending == 1 and torch.equal(buf.global_state["w"], T(1.0, 2.0))


def test_flush_and_returned_state_is_a_copy():
    buf = AsyncBuffer(3, global_state={"w": torch.zeros(2)})
    assert buf.flush() is None
    buf.add(ClientUpdate("a", {"w": torch.ones(2)}, 1, base_version=0))
    out = buf.flush()
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.ones(2)) and buf.version == 1
    out["w"].fill_(100.0)
    assert torch.equal(buf.global_state["w"], torch.ones(2))


def test_options_validated():
    with pytest.raises(StrategyOptionsError, match="buffer_size"):
        AsyncBuffer(0, global_state={"w": T(0.0)})
    with pytest.raises(StrategyOptionsError, match="staleness_weight"):
        AsyncBuffer(2, "exponential", global_state={"w": T(0.0)})
    with pytest.raises(ValueError, match="non-empty"):
        AsyncBuffer(2, global_state={})
