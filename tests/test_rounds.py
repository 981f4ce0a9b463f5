import pytest
import torch

from aggregator.rounds import Outcome, Rejection, Round, select_agents, selection_size
from broker.messages import ModelUpdate

EXPECTED = {"lora_A": torch.zeros(2, 3), "head": torch.zeros(2)}


def upd(agent, rnd=1, base=0, n=10, nonce="x" * 16):
    return ModelUpdate(agent_id=agent, round=rnd, base_version=base, num_examples=n, nonce=nonce)


def good():
    return {"lora_A": torch.ones(2, 3), "head": torch.ones(2)}


def make(selected=("a", "b", "c"), quorum=2, deadline=100.0):
    return Round(1, selected, deadline, 0, quorum, EXPECTED)


def test_completes_when_every_selected_agent_answered():
    r = make()
    for a in "abc":
        assert r.status(1.0) is Outcome.collecting
        r.offer(upd(a), good(), 1.0)
    assert r.status(1.0) is Outcome.complete
    assert r.dropped == []


def test_deadline_with_and_without_quorum():
    r = make()
    r.offer(upd("a"), good(), 1.0)
    assert r.status(101.0) is Outcome.failed
    r.offer(upd("b"), good(), 2.0)
    assert r.status(50.0) is Outcome.collecting
    assert r.status(101.0) is Outcome.deadline
    assert r.dropped == ["c"]


@pytest.mark.parametrize(
    "meta, tensors, now, reason",
    [
        (upd("a", rnd=2), good(), 1.0, "wrong_round"),
        (upd("z"), good(), 1.0, "not_selected"),
        (upd("a"), good(), 200.0, "late"),
        (upd("a", base=3), good(), 1.0, "stale"),
        (upd("a"), {"lora_A": torch.ones(3, 2), "head": torch.ones(2)}, 1.0, "bad_tensors"),
        (upd("a"), {"lora_A": torch.ones(2, 3).double(), "head": torch.ones(2)}, 1.0, "bad_tensors"),
        (upd("a"), {"lora_A": torch.ones(2, 3)}, 1.0, "bad_tensors"),
        (upd("a"), {"lora_A": torch.full((2, 3), float("nan")), "head": torch.ones(2)}, 1.0, "non_finite"),
        (upd("a"), {"lora_A": torch.ones(2, 3), "head": torch.tensor([1.0, float("inf")])}, 1.0, "non_finite"),
    ],
)
def test_rejections_leave_the_round_unchanged(meta, tensors, now, reason):
    r = make()
    with pytest.raises(Rejection) as e:
        r.offer(meta, tensors, now)
    assert e.value.reason == reason
    assert r.accepted == {}


def test_duplicate_refused():
    r = make()
    r.offer(upd("a"), good(), 1.0)
    with pytest.raises(Rejection) as e:
        r.offer(upd("a", nonce="y" * 16), good(), 1.0)
    assert e.value.reason == "duplicate"
    assert len(r.accepted) == 1


def test_selection_is_seeded_and_sized():
    online = [f"a{i}" for i in range(10)]
    assert select_agents(online, 0, 1, 0) == tuple(sorted(online))
    s1 = select_agents(online, 3, 1, 0)
    assert len(s1) == 3 and s1 == select_agents(list(reversed(online)), 3, 1, 0)
    assert any(select_agents(online, 3, r, 0) != s1 for r in range(2, 6))


def test_selection_size_by_count_fraction_and_minimum():
    assert selection_size(10) == 0  # everyone
    assert selection_size(10, per_round=4, fraction=0.9) == 4  # a count wins over a fraction
    assert selection_size(10, fraction=0.3) == 3
    assert selection_size(10, fraction=0.25) == 3  # ceil(2.5)
    assert selection_size(10, fraction=0.2) == 2  # exactly 2, not ceil(2.0000000001)
    assert selection_size(10, fraction=0.1, minimum=3) == 3  # at least the quorum
    assert selection_size(2, fraction=0.1, minimum=3) == 2  # never more than are online
    online = [f"a{i}" for i in range(10)]
    picks = [select_agents(online, selection_size(10, fraction=0.3), r, seed=7) for r in range(1, 6)]
    assert all(len(p) == 3 for p in picks) and len(set(picks)) > 1
    assert picks == [select_agents(online, 3, r, seed=7) for r in range(1, 6)]  # seeded: the same again


def test_over_selection_asks_more_agents_and_completes_with_the_first_target_updates():
    """agents_per_round 4 of 10 online with over_selection 1.5: 6 asked; the round completes with the
    first 4 updates (two agents that never answer cost no deadline) and refuses a fifth as surplus."""
    from aggregator.coordinator import SyncCoordinator
    from aggregator.strategies import make_strategy

    online = [f"a{i}" for i in range(10)]
    coord = SyncCoordinator(make_strategy("fedavg"), EXPECTED, quorum=2, timeout_s=100, seed=0,
                            selection_size=lambda n: 4, over_selection=1.5)
    rnd, _ = coord.open_round(online, now=0.0)
    assert len(rnd.selected) == 6 and rnd.target == 4
    for i, agent in enumerate(rnd.selected[:4]):
        assert coord.offer(upd(agent, nonce=f"{i}" * 16), good(), now=1.0).accepted
        assert (rnd.status(1.0) is Outcome.complete) == (i == 3)
    v = coord.offer(upd(rnd.selected[4], nonce="5" * 16), good(), now=1.5)
    assert not v.accepted and v.reason == "surplus"
    rec = coord.poll(now=2.0)  # long before the deadline
    assert rec.outcome == "complete" and len(rec.answered) == 4 and len(rec.dropped) == 2
    assert {"agent_id": rnd.selected[4], "reason": "surplus"} in rec.rejected
    # without over-selection the same round asks 4 and waits for all of them
    plain = SyncCoordinator(make_strategy("fedavg"), EXPECTED, quorum=2, timeout_s=100, seed=0,
                            selection_size=lambda n: 4)
    rnd, _ = plain.open_round(online, now=0.0)
    assert len(rnd.selected) == 4 and rnd.target == 0
