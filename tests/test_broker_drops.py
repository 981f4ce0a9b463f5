"""A message the broker drops is counted: Mosquitto drops QoS 1 messages for a client whose queue is
full, silently for the sender; the aggregator reads the broker's own count ($SYS) into
edgetune_aggregator_broker_dropped_messages. Real Mosquitto with a queue of 5 and an agent away."""

from __future__ import annotations

import time
import uuid

from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.topics import Topics
from broker.transport import MqttTransport
from edgetune.local_broker import start_mosquitto


def test_messages_the_broker_drops_reach_the_aggregators_metrics(tmp_path):
    broker = start_mosquitto(workdir=tmp_path / "mosq", extra_conf="sys_interval 1\nmax_queued_messages 5")
    try:
        away = MqttTransport("away-agent", broker.url, persistent_session=True)
        away.subscribe(Topics("drops").global_adapter)
        away.connect(timeout=10)
        away.close()  # its session stays, and queues up to 5 messages for it
        pub = MqttTransport(f"pub-{uuid.uuid4().hex[:6]}", broker.url)
        pub.connect(timeout=10)
        for i in range(20):
            pub.publish(Topics("drops").global_adapter, f"m{i}".encode(), wait=True)
        pub.close()
        svc = AggregatorService(AggregatorSettings(broker_url=broker.url, fleet="drops", output_dir=str(tmp_path / "a")))
        svc._connect()
        deadline = time.monotonic() + 10
        value = lambda: svc.metrics.registry.get_sample_value("edgetune_aggregator_broker_dropped_messages")  # noqa: E731
        while time.monotonic() < deadline and not value():
            m = svc.transport.get(timeout=0.5)
            if m is not None:
                svc._handle(m)
        assert value() is not None and value() >= 15, value()  # 20 sent, 5 queued
        svc.transport.close()
    finally:
        broker.close()


def test_a_queue_sized_for_a_round_drops_none_of_its_updates(tmp_path):
    """The config's limits (QueueSizing) for rounds of 40 agents: an aggregator that is away while 40
    updates of ~200 KB and 3 small messages per agent arrive gets every one, and the broker counts
    no drop. (The test above: the same broker with a queue of 5 drops 15 of 20.)"""
    agents, update = 40, b"u" * 200_000
    broker = start_mosquitto(workdir=tmp_path / "mosq", extra_conf="sys_interval 1", round_agents=agents)
    topics = Topics("sized")
    try:
        away = MqttTransport("away-aggregator", broker.url, persistent_session=True)
        away.subscribe(topics.all_updates)
        away.subscribe(topics.all_status)
        away.connect(timeout=10)
        away.close()  # its session queues what comes while it is away
        pub = MqttTransport(f"pub-{uuid.uuid4().hex[:6]}", broker.url)
        pub.connect(timeout=10)
        for i in range(agents):
            pub.publish(topics.update(f"a{i}"), update, wait=True)
            for j in range(3):
                pub.publish(topics.status(f"a{i}"), f"s{j}".encode(), wait=True)
        pub.close()
        back = MqttTransport("away-aggregator", broker.url, persistent_session=True)
        back.subscribe("$SYS/broker/publish/messages/dropped", qos=0)
        back.connect(timeout=10)
        got, dropped, deadline = 0, None, time.monotonic() + 30
        while time.monotonic() < deadline and (got < agents * 4 or dropped is None):
            m = back.get(timeout=0.5)
            if m is None:
                continue
            if m.topic.startswith("$SYS"):
                dropped = int(m.payload)
            else:
                got += 1
        back.close()
        assert (got, dropped) == (agents * 4, 0)
    finally:
        broker.close()
