"""The MQTT transport: paho-mqtt v2, MQTT 5, QoS 1, callbacks that only enqueue.

One `MqttTransport` per process. Subscriptions are registered with `subscribe()` and renewed in
`on_connect`, so they survive reconnects; paho reconnects by itself with exponential backoff
(`reconnect_delay_set`). TCP_NODELAY is set on the socket after every connect (paho does not).
Incoming messages land in `self.inbox` (a queue.Queue); the service loops read it.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)


# The broker's packet limit: one setting, EDGETUNE_MAX_PACKET_BYTES (broker.settings.ConnectionSettings),
# that the transport reads and broker.mosquitto_conf writes into mosquitto.conf as max_packet_size.
DEFAULT_MAX_PACKET_BYTES = 4 * 1024 * 1024
PACKET_HEADROOM = 64 * 1024  # what a packet needs besides the payload: header, topic, properties
MIN_PACKET_BYTES = 2 * PACKET_HEADROOM
MAX_PACKET_BYTES = 268_435_455  # MQTT's largest remaining length

# Frames above the broker's max_packet_size travel as chunks: b"ETK\0", a 16-byte message id,
# index and count (u32), the whole length (u64), then the bytes. The receiver reassembles them
# before anything else sees the frame, whose own sha256 then checks the whole.
CHUNK_MAGIC = b"ETK\x00"
_CHUNK = struct.Struct(">4s16sIIQ")
MAX_PENDING_CHUNK_BYTES = 512 * 1024 * 1024
CHUNK_TTL_S = 120.0


def max_payload_for(max_packet_bytes: int) -> int:
    """The largest payload sent as one packet under a broker limit of max_packet_bytes."""
    if not MIN_PACKET_BYTES <= max_packet_bytes <= MAX_PACKET_BYTES:
        raise ValueError(f"max packet size {max_packet_bytes} bytes: give {MIN_PACKET_BYTES} to {MAX_PACKET_BYTES} "
                         "(EDGETUNE_MAX_PACKET_BYTES, the broker's max_packet_size)")
    return max_packet_bytes - PACKET_HEADROOM


def split_chunks(payload: bytes, max_payload: int) -> list[bytes]:
    if len(payload) <= max_payload:
        return [payload]
    body = max_payload - _CHUNK.size
    msg_id = os.urandom(16)
    count = (len(payload) + body - 1) // body
    return [
        _CHUNK.pack(CHUNK_MAGIC, msg_id, i, count, len(payload)) + payload[i * body : (i + 1) * body]
        for i in range(count)
    ]


class Reassembler:
    """Collects chunks per (topic, message id); returns the whole payload when complete."""

    def __init__(self, max_pending: int = MAX_PENDING_CHUNK_BYTES, ttl: float = CHUNK_TTL_S) -> None:
        self._parts: dict[tuple[str, bytes], dict] = {}
        self._bytes = 0
        self.max_pending, self.ttl = max_pending, ttl
        self.dropped = 0

    def add(self, topic: str, data: bytes) -> bytes | None:
        now = time.monotonic()
        for key in [k for k, v in self._parts.items() if now - v["t"] > self.ttl]:
            self._drop(key)
        if len(data) < _CHUNK.size:
            self.dropped += 1
            return None
        _, mid, idx, count, total = _CHUNK.unpack_from(data)
        if count == 0 or idx >= count or total > self.max_pending:
            self.dropped += 1
            return None
        key = (topic, mid)
        entry = self._parts.setdefault(key, {"t": now, "count": count, "total": total, "parts": {}, "bytes": 0})
        if entry["count"] != count or entry["total"] != total or idx in entry["parts"]:
            return None  # inconsistent or a redelivered chunk
        chunk = data[_CHUNK.size :]
        if self._bytes + len(chunk) > self.max_pending:
            self._drop(key)
            self.dropped += 1
            return None
        entry["parts"][idx] = chunk
        entry["bytes"] += len(chunk)
        self._bytes += len(chunk)
        if len(entry["parts"]) < count:
            return None
        self._drop(key)
        whole = b"".join(entry["parts"][i] for i in range(count))
        return whole if len(whole) == total else None

    def _drop(self, key) -> None:
        entry = self._parts.pop(key, None)
        if entry:
            self._bytes -= entry["bytes"]


class BrokerError(Exception):
    """The broker could not be reached or refused us; the message says what to check."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not u.hostname:
            raise ValueError(f"broker URL {url!r} has no host; expected mqtt://host:port")
        tls = u.scheme in ("mqtts", "ssl")
        return cls(u.hostname, u.port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None = None
    response_topic: str | None = None
    received: float = field(default_factory=time.monotonic)


@dataclass
class Will:
    topic: str
    payload: bytes
    retain: bool = True


class MqttTransport:
    def __init__(
        self,
        client_id: str,
        broker_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        will: Will | None = None,
        persistent_session: bool = False,
        session_expiry_s: int = 3600,
        keepalive: int = 30,
        on_state: "callable | None" = None,
        protocol: int = 5,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
    ) -> None:
        self.client_id = client_id
        self.address = BrokerAddress.parse(broker_url)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        # payloads above max_payload travel in chunks; a retained one is refused (see publish)
        self.max_packet_bytes = max_packet_bytes
        self.max_payload = max_payload_for(max_packet_bytes)
        self._reassembler = Reassembler()
        self._waiting: dict[bytes, Future] = {}  # correlation -> Future of the reply
        self._waiting_lock = threading.Lock()
        self._filters: dict[str, int] = {}
        self._connected = threading.Event()
        self._refused: str | None = None
        self._on_state = on_state
        self._keepalive = keepalive
        self._persistent = persistent_session
        self._session_expiry = session_expiry_s
        self.username = username
        self.reconnects = 0
        self._ever_connected = False
        if protocol not in (4, 5):
            raise ValueError("MQTT protocol must be 5 (MQTT 5) or 4 (MQTT 3.1.1)")
        self.protocol = protocol
        if protocol == 5:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:  # MQTT 3.1.1, for brokers without MQTT 5 (e.g. the amqtt fallback)
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                            clean_session=not persistent_session)
        if username:
            c.username_pw_set(username, password)
        if self.address.tls or ca_file:
            # with cert_file/key_file: a client certificate, for a broker that requires one (mutual TLS)
            c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        # reconnect backoff: doubling from min_delay to max_delay, both drawn per client, so that a fleet
        # that lost its broker at once does not come back in lockstep (a connect storm in waves)
        jitter = random.Random(f"{client_id}:{os.getpid()}:{time.time_ns()}")
        c.reconnect_delay_set(min_delay=jitter.uniform(1.0, 3.0), max_delay=jitter.uniform(20.0, 40.0))
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    # -- paho callbacks: record and enqueue only --------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker %s refused %s: %s", self.address, self.client_id, reason_code)
            return
        sock = client.socket()
        try:
            if sock is not None and hasattr(sock, "setsockopt"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # e.g. an SSL socket wrapper that forwards nothing
            pass
        for filt, qos in self._filters.items():
            client.subscribe(filt, qos=qos)
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._refused = None
        self._connected.set()
        if self._on_state:
            self._on_state(True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if self._on_state:
            self._on_state(False)

    def _on_message(self, client, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        resp = getattr(props, "ResponseTopic", None) if props is not None else None
        payload = msg.payload
        if payload[:4] == CHUNK_MAGIC:
            payload = self._reassembler.add(msg.topic, payload)
            if payload is None:
                return
        m = Incoming(msg.topic, payload, bool(msg.retain), corr, resp)
        if corr is not None:
            with self._waiting_lock:
                fut = self._waiting.pop(corr, None)
            if fut is not None:
                fut.set_result(m)  # a reply someone is waiting for
                return
        self.inbox.put(m)

    # -- API ---------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters[topic_filter] = qos
        if self.connected:
            self._client.subscribe(topic_filter, qos=qos)

    def connect(self, timeout: float = 30.0) -> None:
        kwargs = {}
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            if self._persistent:
                props.SessionExpiryInterval = self._session_expiry
            kwargs = {"clean_start": not self._persistent, "properties": props}
        try:
            self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive, **kwargs)
        except (OSError, ValueError) as e:
            raise BrokerError(f"cannot reach the broker at {self.address}: {e}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.wait(0.1):
                return
            if self._refused:
                self.close()
                raise BrokerError(self._refusal_advice(self._refused))
        self.close()
        tls = (" Over TLS, the handshake fails without a word when the broker's certificate is not signed by "
               "EDGETUNE_CA_FILE's CA, or when the broker requires a client certificate (EDGETUNE_CERT_FILE, "
               "EDGETUNE_KEY_FILE) and this one has none, another CA's, or a revoked one.") if self.address.tls else ""
        raise BrokerError(
            f"no connection to the broker at {self.address} within {timeout:.0f}s: is it running "
            f"and reachable? check EDGETUNE_BROKER_URL.{tls}"
        )

    def _refusal_advice(self, reason: str) -> str:
        who = f"client {self.client_id}" + (f" (user {self.username})" if self.username else "")
        low = reason.lower()
        if "not authorized" in low or "bad user" in low or "password" in low:
            return (
                f"broker {self.address} refused the connection: bad credentials for {who}; "
                "check EDGETUNE_MQTT_USERNAME and EDGETUNE_MQTT_PASSWORD"
            )
        return f"broker {self.address} refused the connection for {who}: {reason}"

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> mqtt.MQTTMessageInfo:
        props = None
        if self.protocol == 5 and (correlation is not None or response_topic is not None):
            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            if response_topic is not None:
                props.ResponseTopic = response_topic
        chunks = split_chunks(payload, self.max_payload)
        if len(chunks) > 1 and retain:
            raise ValueError(f"a retained message must fit in one packet ({len(payload)} > {self.max_payload} bytes; "
                             f"EDGETUNE_MAX_PACKET_BYTES is {self.max_packet_bytes})")
        for chunk in chunks:
            info = self._client.publish(topic, chunk, qos=qos, retain=retain, properties=props)
        if wait and qos > 0:
            self._wait_acked(info, timeout, topic)
        return info

    def _wait_acked(self, info: mqtt.MQTTMessageInfo, timeout: float, topic: str) -> None:
        """Wait for the broker's PUBACK. While disconnected, paho keeps a QoS 1 message queued
        (rc NO_CONN) and sends it after reconnecting, so that is waited out, not an error."""
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_AGAIN):
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + timeout
        with info._condition:  # paho signals this condition when the PUBACK arrives
            while not info._published:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the broker {self.address} did not acknowledge a message on {topic} "
                                       f"within {timeout:.0f}s")
                info._condition.wait(min(remaining, 1.0))

    def expect_reply(self, correlation: bytes) -> Future:
        """A Future resolved (on paho's thread) by the next message carrying this correlation."""
        fut: Future = Future()
        with self._waiting_lock:
            self._waiting[correlation] = fut
        return fut

    def forget_reply(self, correlation: bytes) -> None:
        with self._waiting_lock:
            self._waiting.pop(correlation, None)

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, *, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; `final` is a last (topic, payload) to publish retained first."""
        try:
            if final is not None and self.connected:
                self._client.publish(final[0], final[1], qos=1, retain=True).wait_for_publish(5)
            self._client.disconnect()
        finally:
            self._client.loop_stop()
