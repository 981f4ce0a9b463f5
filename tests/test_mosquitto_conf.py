"""broker.mosquitto_conf: the one source of the Mosquitto configuration and ACL.

The checked-in files (compose, the Helm chart) are its output; each target keeps the settings
every broker of the project needs and differs from the others only where it should. Mosquitto
itself reads them in test_transport.py / test_broker_security.py (local, secure, rendered at
start) and test_deploy_docker_compose.py (the checked-in compose files)."""

from __future__ import annotations

import pytest

from broker.mosquitto_conf import (CHECKED_IN, TARGETS, Listener, MosquittoOptions, TlsFiles, local_options, main,
                                   render_acl, render_mosquitto_conf, render_target, secure_options)
from broker.transport import DEFAULT_MAX_PACKET_BYTES
from tests.deploy_support import REPO, config_lines

REGENERATE = "python -m broker.mosquitto_conf write"
SHARED = [
    "per_listener_settings false", "set_tcp_nodelay true", "persistence true", "autosave_interval 30",
    "max_inflight_messages 100", "max_keepalive 120", "log_type error", "log_type warning", "log_type notice",
    "connection_messages true",
]


@pytest.mark.parametrize("rel", list(CHECKED_IN))
def test_checked_in_files_are_the_renderers_output(rel):
    target, acl = CHECKED_IN[rel]
    assert (REPO / rel).read_text() == render_target(target, acl), (
        f"{rel} is not what broker/mosquitto_conf.py renders: edit the renderer, then run `{REGENERATE}` "
        "from the repository root")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_target_keeps_the_shared_settings(target):
    lines = config_lines(render_target(target))
    for setting in SHARED:
        assert setting in lines, f"{target}: {setting!r} missing"
    packet = [x for x in lines if x.startswith("max_packet_size ")]
    expected = '{{ include "edgetune.maxPacketBytes" . }}' if target == "helm" else str(DEFAULT_MAX_PACKET_BYTES)
    assert packet == [f"max_packet_size {expected}"]
    # listeners come last: an option below a listener (cafile, protocol) belongs to it; the chart's
    # are in template conditions ({{- if ... }} ... {{- end }})
    first = next(i for i, x in enumerate(lines) if x.startswith(("listener ", "{{- if")))
    assert all(x.split()[0] in ("listener", "protocol", "cafile", "certfile", "keyfile", "tls_version",
                                "require_certificate", "{{-") for x in lines[first:]), lines[first:]


def test_the_deliberate_differences():
    local = config_lines(render_target("local"))
    assert "allow_anonymous true" in local and "listener 1883 127.0.0.1" in local
    assert not [x for x in local if x.startswith(("password_file", "acl_file", "log_dest"))]

    secure = config_lines(render_target("secure"))
    assert "allow_anonymous false" in secure and "acl_file /etc/mosquitto/edgetune/acl" in secure
    assert secure[-8:] == ["listener 1883 127.0.0.1", "protocol mqtt", "listener 8883", "protocol mqtt",
                           "cafile /etc/mosquitto/edgetune/certs/ca.crt",
                           "certfile /etc/mosquitto/edgetune/certs/server.crt",
                           "keyfile /etc/mosquitto/edgetune/certs/server.key", "tls_version tlsv1.2"]
    plain_only = config_lines(render_mosquitto_conf(secure_options(tls_port=None)))
    assert plain_only[-2:] == ["listener 1883 127.0.0.1", "protocol mqtt"]
    assert not [x for x in plain_only if x.startswith(("cafile", "certfile", "keyfile"))]

    compose = config_lines(render_target("compose"))
    assert compose[-2:] == ["listener 1883", "protocol mqtt"]  # every interface: the containers, devices
    for setting in ("allow_anonymous false", "password_file /mosquitto/auth/passwd", "acl_file /mosquitto/auth/acl",
                    "persistence_location /mosquitto/data/", "log_dest stdout", "max_queued_messages 4000"):
        assert setting in compose

    helm = config_lines(render_target("helm"))
    # the plain listener unless TLS drops it, and a TLS listener (broker.tls; the chart's helpers decide)
    listeners = helm.index('{{- if include "edgetune.mosquitto.plainListener" . }}')
    assert helm[listeners:] == [
        '{{- if include "edgetune.mosquitto.plainListener" . }}', "listener {{ .Values.mosquitto.port }}",
        "protocol mqtt", "{{- end }}",
        "{{- if .Values.broker.tls.enabled }}", "listener {{ int .Values.broker.tls.port }}", "protocol mqtt",
        "cafile /mosquitto/tls/ca.crt", "certfile /mosquitto/tls/tls.crt", "keyfile /mosquitto/tls/tls.key",
        "tls_version tlsv1.2", "require_certificate {{ .Values.broker.tls.requireClientCertificate }}", "{{- end }}"]
    assert "max_queued_messages {{ int .Values.mosquitto.maxQueuedMessages }}" in helm
    # otherwise the chart's config is compose's
    assert [x for x in helm[:listeners] if "{{" not in x] == [x for x in compose if x not in (
        "listener 1883", "protocol mqtt", f"max_packet_size {DEFAULT_MAX_PACKET_BYTES}", "max_queued_messages 4000",
        "max_queued_bytes 274432000")]
    assert "max_queued_bytes {{ int .Values.mosquitto.maxQueuedBytes }}" in helm
    # require_certificate is written only when given (Mosquitto's default is false)
    mutual = config_lines(render_mosquitto_conf(secure_options(certs=TlsFiles("c", "s", "k", require_certificate=True))))
    assert mutual[-6:] == ["protocol mqtt", "cafile c", "certfile s", "keyfile k", "tls_version tlsv1.2",
                           "require_certificate true"]


def test_the_packet_limit_is_written_from_the_setting():
    assert f"\nmax_packet_size {2 ** 21}\n" in render_target("compose", max_packet_bytes=2 ** 21)
    conf = render_mosquitto_conf(local_options(1884, "/tmp/x/", max_packet_bytes=300_000, user="me"))
    assert config_lines(conf)[0] == "user me"
    assert "max_packet_size 300000" in config_lines(conf) and "listener 1884 127.0.0.1" in config_lines(conf)
    with pytest.raises(ValueError, match="maxPacketBytes"):
        render_target("helm", max_packet_bytes=2 ** 21)


def test_the_acl():
    acl = config_lines(render_acl())
    assert acl == ["user aggregator", "topic readwrite edgetune/#", "topic read $SYS/broker/publish/messages/dropped",
                   "pattern write edgetune/v1/+/agents/%u/#", "pattern read edgetune/v1/+/agents/%u/#",
                   "pattern read edgetune/v1/+/task", "pattern read edgetune/v1/+/round",
                   "pattern read edgetune/v1/+/global", "pattern read edgetune/v1/+/model",
                   "pattern read edgetune/v1/+/keys"]
    one_fleet = config_lines(render_acl("agg", fleet="f1"))
    assert one_fleet[0] == "user agg" and "pattern read edgetune/v1/f1/round" in one_fleet
    assert config_lines(render_target("helm", acl=True))[0] == "user {{ .Values.broker.username }}"


def test_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="listener"):
        render_mosquitto_conf(MosquittoOptions(()))
    with pytest.raises(ValueError, match="password file"):
        render_mosquitto_conf(MosquittoOptions((Listener(1883),), acl_file="/x/acl"))
    with pytest.raises(ValueError, match="needs an ACL"):
        render_mosquitto_conf(MosquittoOptions((Listener(1883),), password_file="/x/passwd"))
    with pytest.raises(ValueError, match="unknown target"):
        render_target("kubernetes")


def test_the_cli(capsys, tmp_path):
    main(["render", "--target", "local"])
    assert capsys.readouterr().out == render_target("local")
    main(["render", "--target", "secure", "--acl"])
    assert capsys.readouterr().out == render_acl()
    main(["render", "--target", "compose", "--max-packet-bytes", "2097152"])
    assert "max_packet_size 2097152" in capsys.readouterr().out
    for rel in CHECKED_IN:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    main(["write", "--root", str(tmp_path)])
    for rel, (target, acl) in CHECKED_IN.items():
        assert (tmp_path / rel).read_text() == render_target(target, acl)
    with pytest.raises(SystemExit):
        main(["write", "--root", str(tmp_path / "nowhere")])


def test_queue_limits_are_sized_for_a_round_with_their_arithmetic_in_the_file():
    """A round of N agents sending at once fits the aggregator's queue: N x (packets of an update
    + 3 small messages), and as many bytes; the file states the arithmetic."""
    from broker.mosquitto_conf import QueueSizing, local_options, render_mosquitto_conf

    q = QueueSizing(10_000, update_bytes=204_000, max_packet_bytes=64 * 1024)
    assert q.chunks == 4 and q.messages == 10_000 * (4 + 3) and q.bytes == 10_000 * (204_000 + 3 * 4096)
    conf = render_mosquitto_conf(local_options(1883, round_agents=10_000))
    lines = config_lines(conf)
    assert "max_queued_messages 40000" in lines and "max_queued_bytes 2744320000" in lines
    assert "10000 agents x (1 packet(s) of a 262144-byte update + 3 small) = 40000" in conf
    with pytest.raises(ValueError, match="positive"):
        QueueSizing(0)
    # `render --round-agents N` (render_target): any target but the chart, whose values hold them
    assert "max_queued_messages 40000" in config_lines(render_target("secure", round_agents=10_000))
    with pytest.raises(ValueError, match="maxQueuedMessages"):
        render_target("helm", round_agents=10_000)
