"""A tree of aggregators equals one aggregator (aggregator/tree.py): K replicas fold their share of
the updates, arriving in a shuffled order, into float64 partial sums; the master combines them and
takes the strategy's server step. For K = 1, 2, 3 and FedAvg, FedAdam (two rounds: its optimiser
state carries over) and FedYogi, the global equals the single-process strategy's on the same
updates to 1e-6 (float32 tensors: both sum in float64 and round once, so they differ by an ulp or
two at most). Updates counted twice are refused; strategies that need every update are refused."""

from __future__ import annotations

import random
import uuid

import pytest
import torch

from aggregator.strategies import make_strategy
from aggregator.strategies.base import ClientUpdate
from aggregator.tree import DuplicateUpdate, Partial, TreeUnsupported, combine, tree_step

SHAPES = {"lora_A": (8, 64), "lora_B": (64, 8), "classifier.bias": (2,)}


def _updates(current, n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(f"agent-{i:03d}", {k: (c + 0.05 * torch.randn(c.shape, generator=g)).float()
                                             for k, c in current.items()},
                         num_examples=int(torch.randint(1, 500, (1,), generator=g)), nonce=uuid.uuid4().hex)
            for i in range(n)]


def _tree(strategy, current, updates, k: int, seed: int):
    order = list(updates)
    random.Random(seed).shuffle(order)  # arrival order, and which replica each lands on
    parts = [Partial(f"replica-{j}", round=1) for j in range(k)]
    for i, u in enumerate(order):
        parts[i % k].fold(current, u, weighted=strategy.tree_weighted)
    random.Random(seed + 1).shuffle(parts)  # the order partials reach the master
    return tree_step(strategy, current, parts)


def _max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name,options", [("fedavg", {}), ("fedadam", {"eta": 0.05}),
                                          ("fedyogi", {"eta": 0.05, "weighted": False})])
def test_the_trees_global_equals_one_aggregators(k, name, options):
    g = torch.Generator().manual_seed(0)
    current = {k_: torch.randn(s, generator=g) for k_, s in SHAPES.items()}
    single, tree = make_strategy(name, **options), make_strategy(name, **options)
    a = b = current
    for rnd in range(2):  # FedAdam/FedYogi: the second step uses the first's moments
        updates = _updates(a, 40, seed=10 * rnd + k)
        a = single.aggregate(a, updates)
        b = _tree(tree, b, updates, k, seed=rnd)
        assert all(a[n].dtype == b[n].dtype == torch.float32 for n in a)
        assert _max_diff(a, b) <= 1e-6, (name, k, rnd, _max_diff(a, b))
        assert _max_diff(a, current) > 1e-3  # and the step moved the global


def test_an_update_counted_twice_is_refused():
    current = {"w": torch.zeros(4)}
    u = ClientUpdate("a-1", {"w": torch.ones(4)}, 10, nonce="n" * 8)
    p, q = Partial("r0", 1), Partial("r1", 1)
    p.fold(current, u)
    with pytest.raises(DuplicateUpdate, match="twice"):
        p.fold(current, u)
    q.fold(current, u)  # a redelivery that reached the other replica too
    with pytest.raises(DuplicateUpdate, match="r0 and r1"):
        combine([p, q])
    total, ids = combine([p])
    assert ids == [("a-1", 1, "n" * 8)] and total.count == 1


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "dp_fedavg", "clip"])
def test_strategies_that_need_every_update_are_refused_on_replicas(name):
    options = {"clip_norm": 1.0, "noise_multiplier": 1.0, "num_agents": 10} if name == "dp_fedavg" else \
        {"bound": 1.0} if name == "clip" else {}
    with pytest.raises(TreeUnsupported, match="every update"):
        tree_step(make_strategy(name, **options), {"w": torch.zeros(2)}, [Partial("r0", 1)])


def test_a_round_aggregates_in_agent_id_order_whatever_order_the_updates_arrive_in():
    """The round engine hands the strategy its updates in agent-id order, so two runs whose updates race
    differently give the same global to the bit (the demo's determinism), whatever the strategy sums in."""
    from aggregator.coordinator import SyncCoordinator
    from aggregator.strategies.averaging import FedAvg
    from broker.messages import ModelUpdate

    class Recording(FedAvg):
        def aggregate(self, current, updates):
            updates = list(updates)
            self.order = [u.agent_id for u in updates]
            return super().aggregate(current, updates)

    g = torch.Generator().manual_seed(1)
    current = {k_: torch.randn(s, generator=g) for k_, s in SHAPES.items()}
    updates = _updates(current, 7, seed=3)
    results = []
    for order_seed in (0, 1, 2):
        strategy = Recording()
        coord = SyncCoordinator(strategy, current, quorum=7, timeout_s=60, seed=0, selection_size=lambda n: n)
        coord.open_round([u.agent_id for u in updates], now=0.0)
        arrival = list(updates)
        random.Random(order_seed).shuffle(arrival)
        for u in arrival:
            meta = ModelUpdate(agent_id=u.agent_id, round=1, base_version=0, num_examples=u.num_examples,
                               nonce=u.nonce)
            assert coord.offer(meta, dict(u.tensors), now=1.0).accepted
        rec = coord.poll(now=2.0)
        assert rec is not None and rec.outcome == "complete"
        assert strategy.order == sorted(u.agent_id for u in updates), (order_seed, strategy.order)
        results.append(rec.new_state)
    assert all(torch.equal(results[0][k_], r[k_]) for r in results[1:] for k_ in SHAPES)
