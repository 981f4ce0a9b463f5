"""The agent's protocol machine (edge_agent.protocol) driven without a broker: events in, actions out.

Each test feeds what a real agent would read from its queue (announcements, globals, a connect,
a finished training) and checks the actions it answers, the way the real and the light agent
(edge_agent.driver) carry them out.
"""

from __future__ import annotations

import subprocess
import sys

from broker.messages import AgentState, GlobalAdapter, RoundAnnouncement
from edge_agent.protocol import (AgentProtocol, Finish, Idle, LoadGlobal, PublishStatus, SendUpdate, Skip, Train)
from tests.conftest import ROOT, child_env

ME = "a1"


def ann(round_number: int, version: int, selected=(ME, "a2"), final: bool = False) -> RoundAnnouncement:
    return RoundAnnouncement(round=round_number, selected=list(selected), deadline=0.0, global_version=version,
                             final=final)


def glob(version: int) -> GlobalAdapter:
    return GlobalAdapter(version=version, round=version)


def deliver(p: AgentProtocol, version: int) -> list:
    """A global arrives and the driver installs it (as edge_agent.driver.ProtocolDriver.act does)."""
    actions = p.on_global(glob(version), {"w": version})
    for a in actions:
        if isinstance(a, LoadGlobal):
            p.global_loaded(a.version)
    return actions


def trains(actions: list) -> list[tuple[int, int]]:
    return [(a.round, a.base_version) for a in actions if isinstance(a, Train)]


def answer(p: AgentProtocol, round_number: int) -> list:
    """Training ended and the broker acknowledged the update."""
    (send,) = p.trained(round_number, f"update-{round_number}")
    assert send == SendUpdate(round_number, f"update-{round_number}")
    assert p.outbox == {round_number: send}
    out = p.sent(round_number)
    assert p.outbox == {} and round_number in p.done
    return out


def test_connect_announces_online():
    p = AgentProtocol(ME)
    assert p.connected() == [PublishStatus(AgentState.online)]
    assert p.poll(0.0) == [Idle()]


def test_announcement_then_global_trains_once():
    p = AgentProtocol(ME)
    assert p.on_announcement(ann(1, 0)) == []
    assert p.poll(0.0) == []  # waits for the announced global: no background work meanwhile
    actions = deliver(p, 0)
    assert [type(a) for a in actions] == [LoadGlobal] and actions[0].tensors == {"w": 0}
    assert p.poll(0.1) == [PublishStatus(AgentState.training), Train(ann(1, 0))]
    assert p.poll(0.2) == [Idle()]  # the round is taken: not started twice
    assert answer(p, 1) == [PublishStatus(AgentState.idle)]
    p.on_announcement(ann(1, 0))  # the retained announcement again (a reconnect)
    assert trains(p.poll(0.3)) == []


def test_global_then_announcement_trains():
    p = AgentProtocol(ME)
    deliver(p, 0)
    assert p.poll(0.0) == [Idle()]
    p.on_announcement(ann(1, 0))
    assert trains(p.poll(0.1)) == [(1, 0)]


def test_global_not_newer_than_the_held_one_is_not_loaded():
    p = AgentProtocol(ME)
    deliver(p, 2)
    assert p.on_global(glob(2), {}) == [] and p.on_global(glob(1), {}) == []
    assert p.global_version == 2


def test_refused_global_is_not_held():
    p = AgentProtocol(ME)
    p.on_announcement(ann(1, 0))
    assert [type(a) for a in p.on_global(glob(0), {})] == [LoadGlobal]  # the driver refuses it: no confirmation
    assert p.global_version == -1
    assert p.poll(0.0) == []


def test_late_join_gets_the_retained_announcement_and_global():
    # an agent that connects mid-round reads both retained messages in one drain, in either order
    for order in ("ann-first", "global-first"):
        p = AgentProtocol(ME)
        assert p.connected() == [PublishStatus(AgentState.online)]
        if order == "ann-first":
            p.on_announcement(ann(3, 2))
            deliver(p, 2)
        else:
            deliver(p, 2)
            p.on_announcement(ann(3, 2))
        assert p.poll(5.0) == [PublishStatus(AgentState.training), Train(ann(3, 2))], order


def test_final_announcement_finishes_once_the_final_global_is_held():
    p = AgentProtocol(ME)
    deliver(p, 3)
    p.on_announcement(ann(4, 4, selected=(), final=True))
    assert p.poll(0.0) == [Idle()]  # waiting for v4: background work goes on
    deliver(p, 4)
    assert p.poll(1.0) == [Finish(global_version=4, final_version=4)]
    assert p.finished
    assert p.poll(2.0) == []  # finished once


def test_final_with_the_global_already_held_finishes_at_once():
    p = AgentProtocol(ME)
    deliver(p, 5)
    p.on_announcement(ann(5, 5, selected=(), final=True))
    assert p.poll(0.0) == [Finish(5, 5)]


def test_no_new_round_after_the_final_announcement():
    p = AgentProtocol(ME)
    deliver(p, 1)
    p.on_announcement(ann(2, 2))  # selected, waiting for v2 ...
    p.on_announcement(ann(2, 2, selected=(), final=True))  # ... when the run ends
    assert p.poll(0.0) == [Skip(2, "final", 1), Idle()]
    deliver(p, 2)
    assert p.poll(1.0) == [Finish(2, 2)]
    # a round that was trainable right away is not started either once the final is in
    q = AgentProtocol(ME)
    deliver(q, 2)
    q.on_announcement(ann(3, 2))
    q.on_announcement(ann(3, 3, selected=(), final=True))
    assert trains(q.poll(0.0)) == []


def test_final_without_its_global_ends_after_the_grace():
    p = AgentProtocol(ME, final_grace_s=30.0)
    deliver(p, 1)
    p.on_announcement(ann(4, 4, selected=(), final=True))
    assert p.poll(100.0) == [Idle()]  # the grace starts at the first poll that sees the final
    assert p.poll(129.9) == [Idle()]
    assert p.poll(130.1) == [Finish(global_version=1, final_version=4, timed_out=True)]


def test_non_final_announcement_after_a_final_clears_it():
    # a retained final from an earlier run, then the restarted run's first round
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(9, 9, selected=(), final=True))
    assert p.poll(0.0) == [Idle()]  # holds v0 of the new run: the old final is not reached
    p.on_announcement(ann(1, 0))
    assert p.final_version is None
    assert trains(p.poll(1.0)) == [(1, 0)]
    answer(p, 1)
    # the cleared final's grace does not carry over to a later final
    p.on_announcement(ann(2, 1, selected=(), final=True))
    assert p.poll(100.0) == [Idle()]


def test_final_then_non_final_in_one_drain_trains_the_new_round():
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(7, 7, selected=(), final=True))
    p.on_announcement(ann(1, 0))
    assert p.poll(0.0) == [PublishStatus(AgentState.training), Train(ann(1, 0))]


def test_announcement_for_an_older_global_is_skipped():
    p = AgentProtocol(ME)
    deliver(p, 3)
    p.on_announcement(ann(3, 2))
    assert p.poll(0.0) == [Skip(3, "superseded", 3)]
    assert p.pending is None and p.poll(0.1) == [Idle()]


def test_announcement_of_an_answered_round_is_not_trained_again():
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(1, 0))
    assert trains(p.poll(0.0)) == [(1, 0)]
    p.on_announcement(ann(1, 0))  # during training (retained, after a reconnect)
    assert p.pending is None
    p.trained(1, "u1")
    p.on_announcement(ann(1, 0))  # trained, not yet acknowledged: in the outbox
    assert p.pending is None
    p.sent(1)
    p.on_announcement(ann(1, 0))  # sent
    assert p.pending is None and trains(p.poll(1.0)) == []


def test_not_selected_does_not_train():
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(1, 0, selected=("a2", "a3")))
    assert p.poll(0.0) == [Idle()]
    # an announcement that leaves this agent out does not cancel the one that selected it
    q = AgentProtocol(ME)
    q.on_announcement(ann(1, 0))
    q.on_announcement(ann(2, 0, selected=("a2",)))
    deliver(q, 0)
    assert trains(q.poll(0.0)) == [(1, 0)]


def test_async_fleet_trains_once_on_the_newest():
    # a slow agent comes back from round 1 to find three announcements and two globals queued
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(1, 0))
    assert trains(p.poll(0.0)) == [(1, 0)]
    answer(p, 1)
    for r, v in ((2, 1), (3, 2), (4, 3)):
        p.on_announcement(ann(r, v))
        if v < 3:
            deliver(p, v)
    assert p.poll(1.0) == []  # round 4 waits for v3, the stale ones are forgotten
    deliver(p, 3)
    assert trains(p.poll(2.0)) == [(4, 3)]
    assert p.poll(3.0) == [Idle()]


def test_async_newer_global_than_the_newest_announcement_skips_it():
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(2, 1))
    deliver(p, 1)
    deliver(p, 2)  # the buffer moved on before the announcement of v2 came
    assert p.poll(0.0) == [Skip(2, "superseded", 2)]
    p.on_announcement(ann(3, 2))
    assert trains(p.poll(0.1)) == [(3, 2)]


def test_outbox_restored_after_a_restart_is_resent_and_not_trained_again():
    p = AgentProtocol(ME)
    assert p.restore(4, b"frame") == [SendUpdate(4, b"frame", resend=True)]
    assert p.sent(4) == []  # sent before the agent says it is online: no idle status
    deliver(p, 3)
    p.on_announcement(ann(4, 3))  # the retained announcement of that round
    assert trains(p.poll(0.0)) == []


def test_stop_sends_nothing_and_starts_nothing():
    p = AgentProtocol(ME)
    deliver(p, 0)
    p.on_announcement(ann(1, 0))
    assert trains(p.poll(0.0)) == [(1, 0)]
    p.stop()
    assert p.trained(1, "u1") == []  # stopped mid-training: the update is not sent
    assert p.outbox == {} and 1 not in p.done
    p.on_announcement(ann(2, 0))
    assert p.poll(1.0) == []


def test_protocol_imports_neither_torch_nor_paho():
    code = "import sys, edge_agent.protocol\nprint('IMPURE', sorted({m.split('.')[0] for m in sys.modules} & " \
           "{'torch', 'paho', 'prometheus_client', 'transformers', 'peft'}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "IMPURE []" in r.stdout


def test_light_agent_imports_no_torch():
    # the light agent runs on devices without torch: its loop (edge_agent.driver) is numpy only
    code = ("import sys, edge_agent.light\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


# -- the rooms around the machine: the durable outbox, and the shared loop with a fake transport ----
def test_outbox_keeps_an_update_until_removed_and_moves_unreadable_files_aside(tmp_path):
    import numpy as np

    from broker import codec
    from broker.messages import ModelUpdate
    from edge_agent.outbox import Outbox

    frame = codec.encode(ModelUpdate(agent_id=ME, round=3, base_version=2, num_examples=5, nonce="n" * 16),
                         {"w": np.zeros(2, np.float32)})
    box = Outbox(tmp_path)
    box.put(3, frame)
    (tmp_path / "outbox" / "round-000009.frame").write_bytes(b"not a frame")
    again = Outbox(tmp_path)  # a restarted agent
    assert list(again.unsent()) == [(3, frame)]
    assert (tmp_path / "outbox" / "round-000009.bad").exists()
    again.remove(3)
    assert list(Outbox(tmp_path).unsent()) == []
    assert list(Outbox(None).unsent()) == [] and Outbox(None).put(1, frame) is None


class FakeTransport:
    def __init__(self, incoming):
        from collections import deque

        self.inbox, self.published = deque(incoming), []

    def get(self, timeout=None):
        return self.inbox.popleft() if self.inbox else None

    def publish(self, topic, payload, **kw):
        self.published.append((topic, payload))


def test_light_agent_loop_late_join_trains_on_the_retained_global_and_finishes():
    import numpy as np

    from broker import codec
    from broker.messages import AgentStatus, ModelUpdate, parse
    from broker.transport import Incoming
    from edge_agent.light import LightAgent, synthetic_update

    agent = LightAgent(ME, "mqtt://127.0.0.1:1", "f")
    t = agent.topics
    g = {"w": np.arange(4, dtype=np.float32)}
    agent.transport = FakeTransport([  # what a late joiner reads at connect: the retained messages
        Incoming(t.round, codec.encode(ann(2, 1)), True),
        Incoming(t.global_adapter, codec.encode(glob(1), g), True),
        Incoming(t.round, b"", True),  # a cleared retained message: ignored
    ])
    agent._on_state(True)
    agent.step(0)
    states = [parse(codec.decode(p).header, AgentStatus).state for tp, p in agent.transport.published
              if tp == t.status(ME)]
    assert states == [AgentState.online, AgentState.training, AgentState.idle]
    (upd,) = [codec.decode(p, as_torch=False) for tp, p in agent.transport.published if tp == t.update(ME)]
    meta = parse(upd.header, ModelUpdate)
    assert (meta.round, meta.base_version) == (2, 1) and agent.sent_updates == [(2, 1)]
    np.testing.assert_array_equal(upd.tensors["w"], synthetic_update(g, ME, 2)["w"])
    agent.transport.inbox.append(Incoming(t.round, codec.encode(ann(2, 1, selected=(), final=True)), True))
    agent.step(0)
    assert agent.proto.finished


def test_an_agent_that_outlives_a_run_takes_part_in_the_next_from_its_round_1():
    """A device daemon: run A ends (final announcement, final global held); run B starts with round 1
    and global v0, which without the run id would be an answered round and an older global."""
    p = AgentProtocol(ME)

    def ann_of(run: str, *a, **kw) -> RoundAnnouncement:
        return ann(*a, **kw).model_copy(update={"run_id": run})

    def deliver_of(run: str, version: int) -> None:
        for a in p.on_global(GlobalAdapter(version=version, round=version, run_id=run), {"w": version}):
            p.global_loaded(a.version)

    p.on_announcement(ann_of("run-a", 1, 0))
    deliver_of("run-a", 0)
    assert trains(p.poll(0.0)) == [(1, 0)]
    answer(p, 1)
    p.on_announcement(ann_of("run-a", 1, 1, selected=(), final=True))
    deliver_of("run-a", 1)
    assert [type(a) for a in p.poll(1.0)] == [Finish] and p.finished
    # the same round and an older global of the same run: ignored, as before
    p.on_announcement(ann_of("run-a", 1, 0))
    assert p.on_global(GlobalAdapter(version=0, round=0, run_id="run-a"), {}) == [] and p.poll(2.0) == []
    # run B: round 1 from global v0 trains again
    p.on_announcement(ann_of("run-b", 1, 0))
    assert not p.finished and p.global_version == -1 and p.done == set() and p.run_id == "run-b"
    deliver_of("run-b", 0)
    assert trains(p.poll(3.0)) == [(1, 0)]
    # messages without a run id (an aggregator that sends none) leave the run as it is
    p.on_announcement(ann(2, 0))
    assert p.run_id == "run-b" and p.global_version == 0


def test_a_training_status_says_how_far_the_round_is():
    """sgd_loop reports every step against the steps planned (epochs x batches, capped); the status of an
    agent that is training carries them, any other status none."""
    import torch

    from broker import codec
    from broker.messages import AgentStatus, parse
    from edge_agent.light import LightAgent
    from models.train import sgd_loop

    w = torch.zeros(3, requires_grad=True)
    heard: list[tuple[int, int]] = []
    sgd_loop([w], 10, lambda idx: (w.sum() - len(idx)) ** 2, epochs=2, batch_size=4, on_step=lambda *a: heard.append(a))
    assert heard == [(i, 6) for i in range(1, 7)]  # 2 epochs of 3 batches
    heard.clear()
    sgd_loop([w], 10, lambda idx: w.sum() ** 2, epochs=2, batch_size=4, max_steps=4, on_step=lambda *a: heard.append(a))
    assert heard[-1] == (4, 4)
    agent = LightAgent("a-1", "mqtt://127.0.0.1:9")
    agent.progress = (12, 40)
    st = parse(codec.decode(agent.status_frame(AgentState.training)).header, AgentStatus)
    assert (st.step, st.steps) == (12, 40)
    st = parse(codec.decode(agent.status_frame(AgentState.idle)).header, AgentStatus)
    assert (st.step, st.steps) == (None, None)
