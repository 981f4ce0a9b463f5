"""The transport against a real Mosquitto (the project's config, a free port)."""

import socket
import time

import pytest

from broker.topics import Topics
from broker.transport import BrokerError, MqttTransport, Will


def _recv(t, topic, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = t.get(timeout=0.2)
        if m is not None and m.topic == topic:
            return m
    raise AssertionError(f"nothing on {topic} within {timeout}s")


def test_publish_subscribe_retained_and_nodelay(mosquitto):
    topics = Topics("t1")
    pub = MqttTransport("pub", mosquitto.url)
    pub.connect()
    pub.publish(topics.round, b"retained-round", retain=True, wait=True)
    sub = MqttTransport("sub", mosquitto.url)
    sub.subscribe(topics.round)
    sub.subscribe(topics.all_updates)
    sub.connect()
    assert _recv(sub, topics.round).payload == b"retained-round"
    pub.publish(topics.update("a1"), b"x" * 100_000, wait=True)
    m = _recv(sub, topics.update("a1"))
    assert m.payload == b"x" * 100_000 and not m.retain
    assert sub._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    pub.close()
    sub.close()


def test_last_will_marks_a_killed_client_offline(mosquitto):
    topics = Topics("t2")
    watcher = MqttTransport("watch", mosquitto.url)
    watcher.subscribe(topics.all_status)
    watcher.connect()
    dying = MqttTransport("dying", mosquitto.url, will=Will(topics.status("a1"), b"offline"), keepalive=5)
    dying.connect()
    dying._client.socket().close()  # the connection drops without a DISCONNECT
    dying._client.loop_stop()
    assert _recv(watcher, topics.status("a1"), timeout=15).payload == b"offline"
    watcher.close()


def test_subscriptions_survive_a_broker_restart(mosquitto):
    topics = Topics("t3")
    sub = MqttTransport("sub3", mosquitto.url)
    sub.subscribe(topics.global_adapter)
    sub.connect()
    mosquitto.restart()
    deadline = time.monotonic() + 30
    while not sub.connected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sub.connected, "did not reconnect by itself"
    assert sub.reconnects >= 1
    pub = MqttTransport("pub3", mosquitto.url)
    pub.connect()
    pub.publish(topics.global_adapter, b"after-restart", wait=True)
    assert _recv(sub, topics.global_adapter).payload == b"after-restart"
    pub.close()
    sub.close()


def test_unreachable_broker_says_what_to_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = MqttTransport("nobody", f"mqtt://127.0.0.1:{port}")
    with pytest.raises(BrokerError, match="EDGETUNE_BROKER_URL"):
        t.connect(timeout=2)


def test_chunks_reassemble_under_the_packet_limit():
    from broker.transport import PACKET_HEADROOM, Reassembler, max_payload_for, split_chunks

    limit = 256 * 1024
    assert max_payload_for(limit) == limit - PACKET_HEADROOM
    payload = bytes(range(256)) * 4096  # 1 MiB
    chunks = split_chunks(payload, max_payload_for(limit))
    assert len(chunks) == 6 and all(len(c) <= max_payload_for(limit) for c in chunks)
    r = Reassembler()
    assert [r.add("t", c) for c in chunks[:-1]] == [None] * 5
    assert r.add("t", chunks[-1]) == payload
    assert split_chunks(b"small", max_payload_for(limit)) == [b"small"]


def test_the_packet_limit_is_checked():
    t = MqttTransport("limits", "mqtt://127.0.0.1:1", max_packet_bytes=256 * 1024)
    assert t.max_payload == 256 * 1024 - 64 * 1024
    with pytest.raises(ValueError, match="a retained message must fit in one packet"):
        t.publish("edgetune/v1/x/global", b"x" * (t.max_payload + 1), retain=True)
    with pytest.raises(ValueError, match="EDGETUNE_MAX_PACKET_BYTES"):
        MqttTransport("tiny", "mqtt://127.0.0.1:1", max_packet_bytes=1000)


def test_the_packet_limit_reaches_the_broker_and_the_transport(tmp_path):
    """One number, EDGETUNE_MAX_PACKET_BYTES: the local broker's max_packet_size and the
    transport's chunking. A sender with the broker's limit gets a 1 MB frame through a 256 KiB
    broker in chunks; one that assumes a larger limit sends a packet the broker refuses."""
    import os

    from edgetune.local_broker import start_mosquitto

    limit = 256 * 1024
    broker = start_mosquitto(workdir=tmp_path / "mosquitto", max_packet_bytes=limit)
    made = []
    try:
        assert f"\nmax_packet_size {limit}\n" in broker.conf.read_text()
        topic = Topics("limit").update("a1")
        sub = MqttTransport("limit-sub", broker.url, max_packet_bytes=limit)
        made.append(sub)
        sub.subscribe(topic)
        sub.connect()
        pub = MqttTransport("limit-pub", broker.url, max_packet_bytes=limit)
        made.append(pub)
        pub.connect()
        payload = os.urandom(1_000_000)
        pub.publish(topic, payload, wait=True)
        assert _recv(sub, topic, timeout=10).payload == payload

        unaware = MqttTransport("limit-unaware", broker.url)  # the default 4 MiB, above this broker's
        made.append(unaware)
        unaware.connect()
        unaware.publish(topic, payload)
        assert sub.get(timeout=2) is None, "the broker passed on a packet above its max_packet_size"
        deadline = time.monotonic() + 10
        while "limit-unaware disconnected due to oversize packet" not in broker.log.read_text():
            assert time.monotonic() < deadline, f"the broker did not refuse the packet:\n{broker.log.read_text()}"
            time.sleep(0.1)
    finally:
        for t in made:
            t.close()
        broker.close()


def test_reconnect_backoff_is_drawn_per_client():
    """A fleet that lost its broker at once comes back spread out, not in lockstep."""
    from broker.transport import MqttTransport

    delays = {(t._client._reconnect_min_delay, t._client._reconnect_max_delay)
              for t in (MqttTransport(f"c-{i}", "mqtt://127.0.0.1:9") for i in range(20))}
    assert len(delays) == 20
    assert all(1.0 <= lo <= 3.0 and 20.0 <= hi <= 40.0 for lo, hi in delays)
