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
