"""`edgetune run`'s live progress: the pure model (plain lines on changes only, the compact live view),
the display's in-place redraw, and the monitor reading a real Mosquitto's retained messages."""

from __future__ import annotations

import re
import time

from broker import codec
from broker.messages import AgentState, AgentStatus, EvalReport, GlobalAdapter, RoundAnnouncement
from broker.settings import ConnectionSettings
from broker.topics import Topics
from edgetune.local_broker import free_port
from edgetune.progress import MAX_NAMES, RunProgress
from edgetune.progress_monitor import ProgressDisplay, erase, open_progress, resolve_mode

NOW = 1_700_000_000.0


def status(agent: str, state: str, version: int = -1, examples: int = 100, holdout: int = 0, **kw) -> AgentStatus:
    return AgentStatus(agent_id=agent, state=AgentState(state), global_version=version, num_examples=examples,
                       eval_examples=holdout, **kw)


def announcement(number: int, selected, version: int, deadline: float = NOW + 90, **kw) -> RoundAnnouncement:
    return RoundAnnouncement(round=number, selected=list(selected), deadline=deadline, global_version=version, **kw)


def report(agent: str, version: int) -> EvalReport:
    return EvalReport(agent_id=agent, version=version, round=version, num_examples=10, loss=0.5)


class SteppedStatus(AgentStatus):
    """A status as a later protocol may send it: with the agent's step in the round."""

    step: int | None = None
    steps: int | None = None


def test_plain_lines_come_only_on_changes_net_and_grouped_by_state():
    p = RunProgress(rounds=5)
    assert p.take_lines() == []
    p.feed(status("agent-1", "online", examples=120))
    assert p.take_lines() == ["agent-1 online (120 examples)"]
    p.feed(status("agent-1", "online", examples=120))  # the same state again: nothing
    assert p.take_lines() == []
    p.feed(GlobalAdapter(version=0, round=0))
    p.feed(announcement(1, ["agent-1", "agent-2"], 0), now=NOW)
    for a in ("agent-10", "agent-2", "agent-1"):
        p.feed(status(a, "training", version=0))
    assert p.take_lines() == ["global v0 published (initial)",
                              "round 1/5 started: 2 agents selected, from global v0, deadline in 1:30",
                              "3 agents training: agent-1, agent-2, agent-10"]
    p.feed(status("agent-1", "idle", version=0))  # training -> idle -> training since the last call: no change
    p.feed(status("agent-1", "training", version=0))
    p.feed(status("agent-2", "refused", reason="its model is not the fleet's"))
    p.feed(status("agent-10", "offline"))
    assert p.take_lines() == ["agent-2 refused: its model is not the fleet's", "agent-10 offline"]
    p.feed(GlobalAdapter(version=0, round=0))  # a retained global seen again: nothing
    p.feed(announcement(1, ["agent-1", "agent-2"], 0), now=NOW + 5)  # nor the same round again
    assert p.take_lines() == []
    many = RunProgress()
    for i in range(MAX_NAMES + 3):
        many.feed(status(f"a{i}", "idle"))
    assert many.take_lines() == [f"{MAX_NAMES + 3} agents idle: a0, a1, a2, a3, a4, a5 and 3 more"]
    many.feed(announcement(4, [], 3, final=True))
    assert many.take_lines() == ["the aggregator announced the end of the run (after round 4)"]


def test_a_globals_evaluation_is_complete_when_every_agent_up_with_a_holdout_reported_it_said_once():
    p = RunProgress(rounds=2)
    for a in ("agent-1", "agent-2"):
        p.feed(status(a, "idle", version=1, holdout=20))
    p.feed(status("agent-3", "idle", version=1))  # no held-out rows: not awaited
    p.feed(GlobalAdapter(version=1, round=1))
    p.feed(report("agent-1", 1))
    p.take_lines()
    assert "evaluation: 1/2 agents reported" in p.view(NOW)[1]
    p.feed(report("agent-2", 1))
    assert p.take_lines() == ["global v1 evaluated on the devices: 2/2 agents reported"]
    p.feed(report("agent-2", 1))
    assert p.take_lines() == []
    # an agent gone offline is no longer awaited; a version the metrics already closed is not said again
    p.feed(GlobalAdapter(version=2, round=2))
    p.feed(report("agent-1", 2))
    p.take_lines()
    p.feed(status("agent-2", "offline", version=2, holdout=20))
    assert "global v2 evaluated on the devices: 1/1 agents reported" in p.take_lines()
    p.feed(GlobalAdapter(version=3, round=3))
    p.row({"eval": "federated", "round": 3, "version": 3, "eval_agents": 1})
    p.feed(report("agent-1", 3))
    assert not any("evaluated" in x for x in p.take_lines())


def test_the_live_view_shows_the_round_deadline_each_agents_state_and_step_and_the_evaluation():
    p = RunProgress(rounds=5)
    assert p.view(NOW) == ["waiting for the aggregator's first round"]
    p.feed(GlobalAdapter(version=2, round=2))
    p.feed(announcement(3, ["agent-1"], 2, deadline=NOW + 125))
    p.feed(SteppedStatus(agent_id="agent-1", state=AgentState.training, global_version=2, num_examples=1200,
                         eval_examples=30, step=12, steps=40))
    p.feed(status("agent-2", "idle", version=2, examples=980, holdout=30))
    p.feed(status("agent-3", "refused", reason="wrong labels"))
    p.feed(report("agent-2", 2))
    p.row({"round": 2, "version": 2, "agents": {"agent-2": {"train_loss": 0.4125}}})
    head, glob, a1, a2, a3 = p.view(NOW + 5)
    assert head == "round 3/5  1 selected  from global v2  deadline in 2:00"
    assert glob == "global v2 (round 2)  evaluation: 1/2 agents reported"
    assert a1.startswith("* agent-1  training") and "step 12/40" in a1 and "1200 examples" in a1 and "global v2" in a1
    assert a2.startswith("  agent-2  idle") and "step" not in a2 and "980 examples" in a2 and "loss 0.4125" in a2
    assert a3 == "  agent-3  refused: wrong labels"
    assert p.view(NOW + 130)[0].endswith("deadline passed 0:05 ago")
    assert all(len(x) <= 30 for x in p.view(NOW, width=30))
    more = p.view(NOW, max_agents=1)
    assert more[-1] == "  and 2 more: 1 idle, 1 refused" and len(more) == 4
    p.feed(announcement(5, [], 5, final=True))
    assert p.view(NOW)[0] == "run over after round 5/5"


def test_the_tty_display_redraws_its_view_in_place_below_the_permanent_lines():
    out: list[str] = []
    now = [NOW]
    model = RunProgress(rounds=2)
    d = ProgressDisplay("tty", lambda line: out.append(line + "\n"), model, write=out.append,
                        size=lambda: (80, 24), clock=lambda: now[0])
    model.feed(announcement(1, ["agent-1"], 0, deadline=NOW + 60))
    model.feed(status("agent-1", "training", version=0))
    d.tick()
    view = model.view(NOW, width=79)
    assert out == ["".join(x + "\n" for x in view)]
    d.tick()  # nothing changed (and too soon): no redraw
    now[0] += 1
    d.tick()  # a second later the countdown changed: up over the old view, clear, the new one
    assert out[-1] == erase(len(view)) + "".join(x + "\n" for x in model.view(now[0], width=79))
    out.clear()
    d.echo("round  1: accuracy 0.5")  # a permanent line: the view comes off, the line, the view again
    assert out[0] == erase(len(view)) and out[1] == "round  1: accuracy 0.5\n" and out[2].startswith("round 1/2")
    d.close()
    assert out[-1] == erase(len(view))
    assert erase(0) == "" and erase(3) == "\x1b[3F\x1b[J"
    assert resolve_mode("auto", type("NotATerminal", (), {"isatty": lambda self: False})()) == "plain"


def test_the_monitor_reads_the_fleets_retained_messages_on_a_real_broker_as_plain_lines(mosquitto):
    conn = ConnectionSettings(broker_url=mosquitto.url, fleet="progress")
    topics = Topics("progress")
    pub = conn.transport("test-publisher", persistent_session=False)
    pub.connect(10)
    try:
        for a, state in (("agent-1", "training"), ("agent-2", "training"), ("agent-3", "idle")):
            pub.publish(topics.status(a), codec.encode(status(a, state, version=0)), retain=True, wait=True)
        pub.publish(topics.round, codec.encode(announcement(1, ["agent-1", "agent-2"], 0, deadline=time.time() + 590)),
                    retain=True, wait=True)
        pub.publish(topics.status("agent-9"), codec.encode(status("agent-1", "idle")), retain=True, wait=True)  # lies
        said: list[str] = []
        display = open_progress("plain", conn, 3, said.append, timeout=5)
        try:
            assert display.mode == "plain"
            deadline = time.monotonic() + 5
            while len(said) < 3 and time.monotonic() < deadline:
                display.tick()
                time.sleep(0.05)
            started = r"round 1/3 started: 2 agents selected, from global v0, deadline in 9:[45]\d"
            assert re.fullmatch(started, said[0]), said
            assert said[1:] == ["2 agents training: agent-1, agent-2", "agent-3 idle (global v0)"], said
            pub.publish(topics.status("agent-3"), codec.encode(status("agent-3", "offline")), retain=True, wait=True)
            deadline = time.monotonic() + 5
            while len(said) < 4 and time.monotonic() < deadline:
                display.tick()
                time.sleep(0.05)
            assert said[3:] == ["agent-3 offline"], said
        finally:
            display.close()
    finally:
        pub.close()
    # no broker there: one warning, and the round lines only
    said = []
    display = open_progress("plain", ConnectionSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}"), 3, said.append,
                            timeout=0.5)
    assert display.mode == "off" and len(said) == 1 and said[0].startswith("warning: no live progress"), said
    display.tick()
    display.echo("round  1: ...")
    assert said[1:] == ["round  1: ..."]
