"""The project's secure broker config (broker.mosquitto_conf, target secure) in a real Mosquitto,
seen through the project's own transport: who may connect, who may write where, and TLS.

The ACL is the production one (deploy/mosquitto/acl); tests/test_deploy_docker_compose.py
checks it rule by rule with the compose config, this file checks that the secure config
enforces it, and that `MqttTransport` reports refusals the way DESIGN.md rule 8 asks.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
import uuid

import numpy as np
import pytest

from broker import codec
from edgetune.local_broker import SecureBroker, start_secure_mosquitto
from broker.messages import ModelUpdate, parse
from broker.topics import Topics
from broker.transport import BrokerError, MqttTransport
from tests.deploy_support import MOSQUITTO_DIR

FLEET = "sec"
T = Topics(FLEET)
USERS = {name: secrets.token_urlsafe(18) for name in ("aggregator", "agent-1", "agent-2")}


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> SecureBroker:
    b = start_secure_mosquitto(tmp_path_factory.mktemp("secure-mosquitto"), USERS,
                               (MOSQUITTO_DIR / "acl").read_text(), tls=True)
    yield b
    b.close()


@pytest.fixture
def clients():
    made: list[MqttTransport] = []

    def make(user: str | None, url: str, *, password: str | None = None, ca_file=None,
             connect: bool = True, timeout: float = 10) -> MqttTransport:
        pw = password if password is not None else USERS.get(user or "")
        t = MqttTransport(f"{user or 'anon'}-{uuid.uuid4().hex[:6]}", url, username=user, password=pw,
                          ca_file=str(ca_file) if ca_file else None)
        made.append(t)
        if connect:
            t.connect(timeout=timeout)
        return t

    yield make
    for t in made:
        try:
            t.close()
        except Exception:
            pass


def _log(b: SecureBroker) -> str:
    return b.log.read_text() if b.log and b.log.exists() else ""


# --- authentication -------------------------------------------------------------------------


def test_refuses_a_client_without_credentials(broker, clients):
    with pytest.raises(BrokerError) as e:
        clients(None, broker.url)
    msg = str(e.value)
    assert "refused" in msg and "EDGETUNE_MQTT_USERNAME" in msg and "EDGETUNE_MQTT_PASSWORD" in msg, msg


def test_refuses_a_wrong_password(broker, clients):
    with pytest.raises(BrokerError) as e:
        clients("agent-1", broker.url, password="not-" + USERS["agent-1"])
    msg = str(e.value)
    assert "bad credentials" in msg and "agent-1" in msg, msg
    assert "EDGETUNE_MQTT_USERNAME" in msg and "EDGETUNE_MQTT_PASSWORD" in msg, msg
    # the right password for the same user gets in: the refusal was about the password
    assert clients("agent-1", broker.url).connected


def test_refuses_an_unknown_user(broker, clients):
    with pytest.raises(BrokerError, match="EDGETUNE_MQTT_PASSWORD"):
        clients("agent-99", broker.url, password=USERS["agent-1"])


# --- authorisation: an agent writes its own topics only -------------------------------------


def _update(agent: str, nonce: str) -> bytes:
    meta = ModelUpdate(agent_id=agent, round=1, base_version=0, num_examples=10, nonce=nonce)
    return codec.encode(meta, {"w": np.zeros(4, np.float32)})


def test_agent_cannot_publish_on_another_agents_update_topic(broker, clients):
    agg = clients("aggregator", broker.url)
    agg.subscribe(T.all_updates)
    a1 = clients("agent-1", broker.url)
    time.sleep(0.3)  # the aggregator's SUBACK: subscribe() does not wait for it
    # paho tells us what the broker answered each QoS 1 publish (MQTT 5 PUBACK reason code)
    acks: dict[int, object] = {}
    got_acks = threading.Condition()

    def on_publish(client, userdata, mid, reason_code, properties):
        with got_acks:
            acks[mid] = reason_code
            got_acks.notify_all()

    a1._client.on_publish = on_publish
    forged = a1.publish(T.update("agent-2"), _update("agent-2", "forged-update"), wait=True, timeout=10)
    own = a1.publish(T.update("agent-1"), _update("agent-1", "own-update"), wait=True, timeout=10)
    with got_acks:
        got_acks.wait_for(lambda: {forged.mid, own.mid} <= set(acks), timeout=10)
    assert acks[forged.mid].is_failure and "authori" in str(acks[forged.mid]).lower(), acks
    assert not acks[own.mid].is_failure, acks

    # one client's messages arrive in order: once the agent's own update is in, the forged one
    # (published before it) would have been delivered already
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = agg.get(timeout=0.5)
        if m is None:
            continue
        meta = parse(codec.decode(m.payload, as_torch=False).header, ModelUpdate)
        seen.append((m.topic, meta.agent_id, meta.nonce))
        if meta.nonce == "own-update":
            break
    assert (T.update("agent-1"), "agent-1", "own-update") in seen, f"the agent's own update never arrived: {seen}"
    assert all(nonce != "forged-update" for *_, nonce in seen), f"the broker let agent-1 write agent-2's topic: {seen}"
    assert [t for t, *_ in seen] == [T.update("agent-1")], seen
    # and nothing more comes later
    assert agg.get(timeout=0.5) is None


# --- TLS -----------------------------------------------------------------------------------


def test_tls_with_the_ca_works(broker, clients):
    assert broker.tls_url.startswith("mqtts://127.0.0.1:")
    agg = clients("aggregator", broker.tls_url, ca_file=broker.ca_file)
    agg.subscribe(T.all_status)
    a1 = clients("agent-1", broker.tls_url, ca_file=broker.ca_file)
    assert agg.connected and a1.connected
    cipher = agg._client.socket().version()  # the paho socket is an ssl.SSLSocket
    assert cipher in ("TLSv1.2", "TLSv1.3"), cipher
    time.sleep(0.3)
    a1.publish(T.status("agent-1"), b"over tls", wait=True, timeout=10)
    m = agg.get(timeout=10)
    assert m is not None and m.topic == T.status("agent-1") and m.payload == b"over tls"
    # credentials are still checked on the TLS listener
    with pytest.raises(BrokerError, match="EDGETUNE_MQTT_PASSWORD"):
        clients("agent-1", broker.tls_url, ca_file=broker.ca_file, password="wrong")


def test_tls_with_a_wrong_ca_fails(broker, clients, tmp_path):
    from edgetune.dev_tls import make_test_certs

    other = make_test_certs(tmp_path / "other-ca")  # a CA that did not sign the broker's certificate
    with pytest.raises(BrokerError):
        clients("aggregator", broker.tls_url, ca_file=other.ca_cert, timeout=4)
    # and the reason is the certificate check (paho retries it in its thread until the timeout)
    import socket

    ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_tls_without_the_ca_fails(broker, clients):
    # mqtts:// without ca_file checks the broker against the system's CAs, which do not know ours
    with pytest.raises(BrokerError):
        clients("aggregator", broker.tls_url, timeout=4)


def test_plain_mqtt_to_the_tls_listener_fails(broker, clients):
    with pytest.raises(BrokerError):
        clients("aggregator", f"mqtt://127.0.0.1:{broker.tls_port}", timeout=4)


def test_the_test_certificates(broker):
    """The server certificate verifies against the generated CA for 127.0.0.1 and localhost."""
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    cert = x509.load_pem_x509_certificate((broker.workdir / "certs" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct((broker.workdir / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
    import socket

    for host in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                assert s.version() in ("TLSv1.2", "TLSv1.3")
