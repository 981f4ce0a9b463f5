"""broker.topics: every topic the project builds parses back to its kind and agent; anything
else is a TopicError (a WireError whose reason, bad_topic, is the rejection metric's label)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import TopicError, WireError
from broker.topics import ParsedTopic, TopicKind, Topics

T = Topics("fleet-1")
AGENT_KINDS = {
    TopicKind.status: T.status,
    TopicKind.update: T.update,
    TopicKind.eval: T.eval,
    TopicKind.split_forward: T.split_forward,
    TopicKind.split_gradient: T.split_gradient,
}


def test_fleet_topics():
    assert T.parse("edgetune/v1/fleet-1/round") == ParsedTopic(TopicKind.round, None)
    assert T.parse(T.round) == ParsedTopic(TopicKind.round)
    assert T.parse(T.global_adapter) == ParsedTopic(TopicKind.global_adapter)


@pytest.mark.parametrize("kind", list(AGENT_KINDS), ids=lambda k: k.value)
def test_agent_topics(kind):
    topic = AGENT_KINDS[kind]("kiosk-17")
    assert T.parse(topic) == ParsedTopic(kind, "kiosk-17")


def test_the_literal_scheme():
    """The strings themselves (the ACL and the devices already in the field depend on them)."""
    base = "edgetune/v1/fleet-1/agents/a.b_c"
    assert T.parse(f"{base}/status").kind is TopicKind.status
    assert T.parse(f"{base}/update").kind is TopicKind.update
    assert T.parse(f"{base}/eval").kind is TopicKind.eval
    assert T.parse(f"{base}/split/fwd").kind is TopicKind.split_forward
    assert T.parse(f"{base}/split/grad") == ParsedTopic(TopicKind.split_gradient, "a.b_c")


def test_every_kind_is_covered():
    assert set(AGENT_KINDS) | {TopicKind.task, TopicKind.round, TopicKind.global_adapter,
                               TopicKind.model, TopicKind.keys, TopicKind.broker_dropped} == set(TopicKind)
    assert T.parse(T.task) == ParsedTopic(TopicKind.task)
    assert T.parse(T.model) == ParsedTopic(TopicKind.model)
    assert T.parse("$SYS/broker/publish/messages/dropped") == ParsedTopic(TopicKind.broker_dropped)


@given(agent=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"), kind=st.sampled_from(list(AGENT_KINDS)))
def test_round_trip(agent, kind):
    assert T.parse(AGENT_KINDS[kind](agent)) == ParsedTopic(kind, agent)


@pytest.mark.parametrize("topic", [
    "edgetune/v1/fleet-2/round",                 # another fleet
    "edgetune/v1/fleet-2/agents/a1/update",
    "edgetune/v1/fleet-10/round",                # a fleet whose name starts like ours
    "edgetune/v2/fleet-1/round",                 # another version
    "edgetune/v1/fleet-1",                       # the base itself
    "other/v1/fleet-1/round",
    "",
])
def test_wrong_fleet(topic):
    with pytest.raises(TopicError, match="not in fleet 'fleet-1'"):
        T.parse(topic)


@pytest.mark.parametrize("agent", ["", "+", "#", "-lead", "a b", "ä", "x" * 65])
def test_bad_agent_segment(agent):
    with pytest.raises(TopicError, match="no valid agent segment"):
        T.parse(f"edgetune/v1/fleet-1/agents/{agent}/update")


def test_no_agent_segment_at_all():
    for topic in ("edgetune/v1/fleet-1/agents", "edgetune/v1/fleet-1/agents/"):
        with pytest.raises(TopicError, match="no valid agent segment"):
            T.parse(topic)


@pytest.mark.parametrize("rest", [
    "roundx", "global/x", "round/", "agents/a1", "agents/a1/", "agents/a1/updates",
    "agents/a1/update/x", "agents/a1/split", "agents/a1/split/fwd/x", "agents/a1/split/bwd", "status",
    "agent/a1/update",
])
def test_unknown_suffix(rest):
    with pytest.raises(TopicError, match="nothing is expected on topic"):
        T.parse(f"edgetune/v1/fleet-1/{rest}")


def test_a_topic_error_is_a_wire_error_with_a_reason():
    with pytest.raises(WireError) as e:
        T.parse("edgetune/v1/fleet-1/agents/a1/nope")
    assert e.value.reason == "bad_topic"
