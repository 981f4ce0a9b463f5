"""The one source of EdgeTune's Mosquitto configuration and ACL.

`render_mosquitto_conf(options)` and `render_acl(...)` are pure functions; each place that runs
a Mosquitto takes its options from one function here:

    local    the one-machine runner and the tests (edgetune.local_broker renders it at start)
    secure   passwords, the ACL and a TLS listener (a host install; the security tests)
    compose  deploy/mosquitto/mosquitto.conf and acl (checked in, generated)
    helm     deploy/helm/edgetune/files/mosquitto.conf and acl (checked in, generated; the
             chart's values fill the {{ }} expressions through `tpl`)

The broker's packet limit is the wire's one setting EDGETUNE_MAX_PACKET_BYTES (the transport
chunks above it); every target writes it as max_packet_size (the chart: its value maxPacketBytes).

    python -m broker.mosquitto_conf render --target secure [--acl]   # print one
    python -m broker.mosquitto_conf render --target secure --round-agents 10000   # queues for rounds of 10,000
    python -m broker.mosquitto_conf write                            # regenerate the checked-in files
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from broker.topics import BROKER_DROPPED
from broker.transport import DEFAULT_MAX_PACKET_BYTES

GENERATED = "Generated from broker/mosquitto_conf.py by `python -m broker.mosquitto_conf write`: edit that."


@dataclass(frozen=True)
class TlsFiles:
    cafile: str
    certfile: str
    keyfile: str
    version: str = "tlsv1.2"  # the minimum (TLS 1.3 is taken where both sides have it)
    # mutual TLS: every client presents a certificate signed by cafile (the password login still
    # applies). None: not written (Mosquitto's default, false); a str holds a template expression
    require_certificate: bool | str | None = None
    crlfile: str | None = None  # revoked client certificates (edgetune.provision; re-read on SIGHUP)


@dataclass(frozen=True)
class Listener:
    port: int | str  # a str holds a template expression (the Helm chart)
    bind: str | None = None  # None: every interface
    tls: TlsFiles | None = None
    comment: str = ""
    # a template condition (the Helm chart): the listener's block is rendered only where it holds
    condition: str | None = None


ROUND_AGENTS = 1000  # the largest round a broker is sized for unless told (render --round-agents)
UPDATE_BYTES = 256 * 1024  # an update frame: the demo adapter's is ~204 KB (MiniLM-4L, LoRA r=8)
SMALL_PER_AGENT = 3  # besides its update, an agent sends the aggregator per round: an eval report, 2 status changes
SMALL_BYTES = 4096  # the most a status or eval report frame takes


@dataclass(frozen=True)
class QueueSizing:
    """Per-client queue limits sized for one round, so that the broker never drops an update: when
    every selected agent sends at once, the aggregator's queue holds them all (Mosquitto drops QoS 1
    messages beyond max_queued_messages or max_queued_bytes for a client, silently for the sender;
    10,000 updates sent at once against a queue of 1,000 reached a subscriber 4,056 times).

    messages = round_agents x (chunks of an update + SMALL_PER_AGENT)
    bytes    = round_agents x (update_bytes + SMALL_PER_AGENT x SMALL_BYTES)

    The limits are per client and the same for every client (Mosquitto 2 has no per-client limit):
    a device away with a persistent session may queue as much, though only a round announcement
    and a global a round are published to it (a global and its chunks: update_bytes)."""

    round_agents: int = ROUND_AGENTS  # agents selected in a round, over-selection included
    update_bytes: int = UPDATE_BYTES
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES

    def __post_init__(self) -> None:
        if self.round_agents < 1 or self.update_bytes < 1 or self.max_packet_bytes < 1:
            raise ValueError(f"queue sizing needs positive numbers, got {self}")

    @property
    def chunks(self) -> int:
        """Packets of one update: the transport chunks frames above max_packet_bytes."""
        return -(-self.update_bytes // self.max_packet_bytes)

    @property
    def messages(self) -> int:
        return self.round_agents * (self.chunks + SMALL_PER_AGENT)

    @property
    def bytes(self) -> int:
        return self.round_agents * (self.update_bytes + SMALL_PER_AGENT * SMALL_BYTES)

    def directives(self) -> list[str]:
        return [f"# Sized for a round of {self.round_agents} agents (broker.mosquitto_conf.QueueSizing), so that",
                "# the aggregator's queue holds every update sent at once and none is dropped:",
                f"#   messages: {self.round_agents} agents x ({self.chunks} packet(s) of a {self.update_bytes}-byte "
                f"update + {SMALL_PER_AGENT} small) = {self.messages}",
                f"#   bytes:    {self.round_agents} x ({self.update_bytes} + {SMALL_PER_AGENT} x {SMALL_BYTES}) = "
                f"{self.bytes} ({self.bytes / 2**20:.0f} MiB at most, per client that falls behind)",
                "# A message the broker still drops is counted ($SYS/broker/publish/messages/dropped, which the",
                "# aggregator exports as edgetune_aggregator_broker_dropped_messages).",
                f"max_queued_messages {self.messages}", f"max_queued_bytes {self.bytes}"]


@dataclass(frozen=True)
class MosquittoOptions:
    listeners: tuple[Listener, ...]
    password_file: str | None = None  # None: anonymous clients (loopback only)
    acl_file: str | None = None
    persistence_location: str = "/var/lib/mosquitto/"
    max_packet_size: int | str = DEFAULT_MAX_PACKET_BYTES
    max_queued_messages: int | str = 1000  # where queue is None (the chart: its values)
    max_queued_bytes: int | str | None = None  # where queue is None; None: not written (no limit)
    queue: QueueSizing | None = None  # limits sized for a round, with their arithmetic in the file
    log_stdout: bool = False
    user: str | None = None  # run as this user (a broker started by whoever runs the tests)
    header: str = ""
    extra: str = ""  # more directives, above the listeners


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.strip("\n").splitlines()] if text else []


def _auth(o: MosquittoOptions) -> list[str]:
    if o.password_file is None:
        if o.acl_file is not None:
            raise ValueError("an ACL needs a password file: the ACL keys agents by username")
        return ["# No login: bind the listeners to loopback only.", "allow_anonymous true"]
    if o.acl_file is None:
        raise ValueError("a password file needs an ACL: without one every user may write every agent's topics")
    return [
        "# Every client logs in: an agent with its agent id as username, the aggregator as `aggregator`;",
        "# the ACL keeps each agent in its own topics.",
        "allow_anonymous false",
        f"password_file {o.password_file}",
        f"acl_file {o.acl_file}",
    ]


def _listener(listener: Listener) -> list[str]:
    lines = _comment(listener.comment)
    lines.append(f"listener {listener.port}" + (f" {listener.bind}" if listener.bind else ""))
    lines.append("protocol mqtt")
    if listener.tls:
        t = listener.tls
        lines += [f"cafile {t.cafile}", f"certfile {t.certfile}", f"keyfile {t.keyfile}",
                  "# the minimum TLS version (TLS 1.3 is taken where both sides have it)", f"tls_version {t.version}"]
        if t.require_certificate is not None:
            value = t.require_certificate if isinstance(t.require_certificate, str) else str(t.require_certificate).lower()
            lines += ["# true: mutual TLS, every client presents a certificate signed by cafile (and still logs in)",
                      f"require_certificate {value}"]
        if t.crlfile:
            lines += ["# certificates revoked by `edgetune provision revoke` (re-read on SIGHUP, like the password",
                      "# file: a revoked device is disconnected and refused at its next handshake)",
                      f"crlfile {t.crlfile}"]
    if listener.condition:
        lines = [f"{{{{- if {listener.condition} }}}}", *lines, "{{- end }}"]
    return lines


def render_mosquitto_conf(o: MosquittoOptions) -> str:
    """mosquitto.conf (Mosquitto 2.x) for these options. Global settings first, the listeners
    last: an option such as cafile applies to the listener above it."""
    if not o.listeners:
        raise ValueError("a Mosquitto config needs at least one listener")
    blocks = [
        _comment(o.header),
        ([f"user {o.user}"] if o.user else []) + ["per_listener_settings false"],
        _auth(o),
        ["# Frames above this are chunked by the sender (broker.transport, EDGETUNE_MAX_PACKET_BYTES: the",
         "# same number); set explicitly because Mosquitto 2.0 has no limit and 2.1+ defaults to 2 MB.",
         f"max_packet_size {o.max_packet_size}",
         "# Small QoS 1 round trips: with Nagle on, a 1 KB request/response took ~88 ms; with this and",
         "# TCP_NODELAY on the client socket, ~0.5 ms.",
         "set_tcp_nodelay true"],
        ["# Retained round / global messages and persistent sessions survive a broker restart.",
         "persistence true", f"persistence_location {o.persistence_location}", "autosave_interval 30"],
        (o.queue.directives() if o.queue is not None else
         ["# Per-client queue while a persistent-session agent is away, or the aggregator falls behind",
          "# (sized for a round: broker.mosquitto_conf.QueueSizing).", f"max_queued_messages {o.max_queued_messages}"]
         + ([f"max_queued_bytes {o.max_queued_bytes}"] if o.max_queued_bytes is not None else []))
        + ["# Inflight window per client; the longest keepalive a client may ask for.",
           "max_inflight_messages 100", "max_keepalive 120"],
        (["log_dest stdout"] if o.log_stdout else [])
        + ["log_type error", "log_type warning", "log_type notice", "connection_messages true"],
        o.extra.strip("\n").splitlines(),
        *(_listener(listener) for listener in o.listeners),
    ]
    return "\n\n".join("\n".join(b) for b in blocks if b) + "\n"


def render_acl(aggregator_user: str = "aggregator", fleet: str = "+", header: str = "") -> str:
    """The ACL: the aggregator may read and write the whole EdgeTune tree; every other user
    (an agent, username = agent id) its own subtree and the fleet's round and global topics.
    `fleet` narrows the agents' rules to one fleet ("+": every fleet)."""
    base = f"edgetune/v1/{fleet}"
    lines = (_comment(header) + [""] if header else []) + [
        "# Mosquitto ACL for EdgeTune (topic scheme: broker/topics.py).",
        "#",
        "#   edgetune/v1/<fleet>/task                   the aggregator writes, every agent reads",
        "#   edgetune/v1/<fleet>/round                  the aggregator writes, every agent reads",
        "#   edgetune/v1/<fleet>/global                 the aggregator writes, every agent reads",
        "#   edgetune/v1/<fleet>/model                  the aggregator writes, every agent reads",
        "#   edgetune/v1/<fleet>/keys                   the aggregator writes, every agent reads",
        "#   edgetune/v1/<fleet>/agents/<agent>/...     that agent reads and writes; the aggregator too",
        "#",
        "# `pattern` lines apply to every client; %u is the client's username, so an agent logs in",
        "# with its agent id as username and can neither write nor read another agent's topics.",
        "",
        "# the aggregator: the whole EdgeTune tree, every fleet",
        f"user {aggregator_user}",
        "topic readwrite edgetune/#",
        "# ... and the broker's count of messages it dropped (a full queue): a metric of the aggregator's",
        f"topic read {BROKER_DROPPED}",
        "",
        "# every agent: its own subtree (status with last will, update, split/fwd, split/grad) ...",
        f"pattern write {base}/agents/%u/#",
        f"pattern read {base}/agents/%u/#",
        "# ... and the fleet's task, round announcement, global adapter, ONNX model and signing keys. (Mosquitto logs a warning that",
        "# these patterns hold no %u/%c: intended, they are the rules every client shares; a plain",
        "# `topic` line would only apply to one `user`, or to anonymous clients.)",
        f"pattern read {base}/task",
        f"pattern read {base}/round",
        f"pattern read {base}/global",
        f"pattern read {base}/model",
        f"pattern read {base}/keys",
    ]
    return "\n".join(lines) + "\n"


# -- the targets ------------------------------------------------------------------------------

def local_options(port: int = 1883, persistence_location: str = "/var/lib/mosquitto/", *,
                  max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES, user: str | None = None,
                  extra: str = "", round_agents: int = ROUND_AGENTS) -> MosquittoOptions:
    """Anonymous, on loopback: the one-machine runner and the tests (edgetune.local_broker)."""
    return MosquittoOptions(
        (Listener(port, "127.0.0.1", comment="loopback only: no login"),), persistence_location=persistence_location,
        max_packet_size=max_packet_bytes, user=user, extra=extra,
        queue=QueueSizing(round_agents, max_packet_bytes=max_packet_bytes),
        header="EdgeTune's Mosquitto configuration (Mosquitto 2.x) for one machine: the one-machine runner\n"
               "and the tests render it at start (edgetune.local_broker) with their port and folder.")


def secure_options(port: int = 1883, tls_port: int | None = 8883, *, files: str = "/etc/mosquitto/edgetune",
                   password_file: str | None = None, acl_file: str | None = None, certs: TlsFiles | None = None,
                   persistence_location: str = "/var/lib/mosquitto/", max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
                   user: str | None = None, extra: str = "", round_agents: int = ROUND_AGENTS) -> MosquittoOptions:
    """Every client logs in, the ACL applies, remote devices come in over TLS (tls_port None: no
    TLS listener). File paths default to `files`/passwd, acl and certs/{ca.crt,server.crt,server.key}."""
    certs = certs or TlsFiles(f"{files}/certs/ca.crt", f"{files}/certs/server.crt", f"{files}/certs/server.key")
    listeners = [Listener(port, "127.0.0.1", comment=(
        "Plain MQTT on loopback only: an aggregator or agent on the broker's own host. Passwords\n"
        "cross this listener in clear text, so never bind it to another interface."))]
    if tls_port is not None:
        listeners.append(Listener(tls_port, tls=certs, comment=(
            "MQTT over TLS for everything else (mqtts://host:8883 with EDGETUNE_CA_FILE on the clients).\n"
            "Listener options apply to the listener above them: keep this block last.")))
    return MosquittoOptions(
        tuple(listeners), password_file=password_file or f"{files}/passwd", acl_file=acl_file or f"{files}/acl",
        persistence_location=persistence_location, max_packet_size=max_packet_bytes, user=user, extra=extra,
        queue=QueueSizing(round_agents, max_packet_bytes=max_packet_bytes),
        header="EdgeTune's secure Mosquitto configuration (Mosquitto 2.x): every client logs in, the ACL\n"
               "keeps each agent in its own topics, and remote devices come in over TLS. Make the files with:\n"
               '  mosquitto_passwd -c -b passwd aggregator "$(openssl rand -base64 24)"   # then -b for each agent\n'
               "  python -m edgetune.dev_tls certs/ --host <broker name or IP> ...     # a test CA + server cert\n"
               "  python -m broker.mosquitto_conf render --acl > acl    # an agent's username is its agent id")


def compose_options(max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> MosquittoOptions:
    return MosquittoOptions(
        (Listener(1883, comment="all interfaces: the other containers, and real devices through the published port"),),
        password_file="/mosquitto/auth/passwd", acl_file="/mosquitto/auth/acl",
        persistence_location="/mosquitto/data/", max_packet_size=max_packet_bytes, log_stdout=True,
        queue=QueueSizing(max_packet_bytes=max_packet_bytes),
        header=f"{GENERATED}\n\n"
               "Mosquitto 2.x configuration for the EdgeTune compose demo (deploy/compose.yaml); the test\n"
               "tests/test_deploy_docker_compose.py starts a real Mosquitto with this file and its ACL.\n"
               "compose copies passwd and acl from deploy/mosquitto/ to /mosquitto/auth/ with mode 0600 at\n"
               "start (Mosquitto warns about, and later versions refuse, world-readable credential files).")


def helm_options() -> MosquittoOptions:
    """The chart's (deploy/helm/edgetune): its values fill the {{ }} expressions, and its helpers
    decide which listeners there are (broker.tls.*; templates/_helpers.tpl)."""
    plain = Listener("{{ .Values.mosquitto.port }}", condition='include "edgetune.mosquitto.plainListener" .', comment=(
        "plain MQTT, all interfaces: the broker's Service; with broker.tls.enabled only with\n"
        "broker.tls.keepPlainListener, and then only on the cluster-internal Service <fullname>-mosquitto-internal"))
    tls = Listener("{{ int .Values.broker.tls.port }}", condition=".Values.broker.tls.enabled", tls=TlsFiles(
        "/mosquitto/tls/ca.crt", "/mosquitto/tls/tls.crt", "/mosquitto/tls/tls.key",
        require_certificate="{{ .Values.broker.tls.requireClientCertificate }}"), comment=(
        "MQTT over TLS (broker.tls.enabled): the broker's Service; the certificate Secret (cert-manager's or\n"
        "broker.tls.existingSecret) is mounted at /mosquitto/tls. Options below a listener belong to it: keep it last."))
    return MosquittoOptions(
        (plain, tls),
        password_file="/mosquitto/auth/passwd", acl_file="/mosquitto/auth/acl",
        persistence_location="/mosquitto/data/", max_packet_size='{{ include "edgetune.maxPacketBytes" . }}',
        max_queued_messages="{{ int .Values.mosquitto.maxQueuedMessages }}",
        max_queued_bytes="{{ int .Values.mosquitto.maxQueuedBytes }}", log_stdout=True,
        header=f"{GENERATED}\n\n"
               "The chart's Mosquitto (templates/mosquitto-configmap.yaml renders this with `tpl`); the init\n"
               "container writes passwd (hashed) and acl to /mosquitto/auth.")


TARGETS = {"local": local_options, "secure": secure_options, "compose": compose_options, "helm": helm_options}
HELM_ACL_USER = "{{ .Values.broker.username }}"


def render_target(target: str, acl: bool = False, max_packet_bytes: int | None = None,
                  round_agents: int | None = None) -> str:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    if acl:
        generated = GENERATED if target in ("compose", "helm") else ""
        return render_acl(HELM_ACL_USER if target == "helm" else "aggregator", header=generated)
    if target == "helm" and max_packet_bytes is not None:
        raise ValueError("the chart's packet limit is its value maxPacketBytes (helm --set maxPacketBytes=N)")
    if target == "helm" and round_agents is not None:
        raise ValueError("the chart's queue limits are its values mosquitto.maxQueuedMessages and maxQueuedBytes")
    kw = {} if max_packet_bytes is None else {"max_packet_bytes": max_packet_bytes}
    o = TARGETS[target](**kw)
    if round_agents is not None:
        o = replace(o, queue=QueueSizing(round_agents, max_packet_bytes=o.queue.max_packet_bytes))
    return render_mosquitto_conf(o)


# the checked-in files (paths from the repository root) and what each is rendered from
CHECKED_IN = {
    "deploy/mosquitto/mosquitto.conf": ("compose", False),
    "deploy/mosquitto/acl": ("compose", True),
    "deploy/helm/edgetune/files/mosquitto.conf": ("helm", False),
    "deploy/helm/edgetune/files/acl": ("helm", True),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m broker.mosquitto_conf", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print a target's mosquitto.conf (or, with --acl, its ACL)")
    r.add_argument("--target", choices=list(TARGETS), default="secure")
    r.add_argument("--acl", action="store_true", help="the ACL instead of mosquitto.conf")
    r.add_argument("--max-packet-bytes", type=int, default=None,
                   help=f"max_packet_size (default {DEFAULT_MAX_PACKET_BYTES}; give clients the same "
                        "EDGETUNE_MAX_PACKET_BYTES)")
    r.add_argument("--round-agents", type=int, default=None,
                   help=f"size the queues for rounds of this many agents (default {ROUND_AGENTS}; QueueSizing)")
    w = sub.add_parser("write", help="regenerate the checked-in files: " + ", ".join(CHECKED_IN))
    w.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: here)")
    args = ap.parse_args(argv)
    if args.command == "render":
        try:
            sys.stdout.write(render_target(args.target, args.acl, args.max_packet_bytes, args.round_agents))
        except ValueError as e:
            ap.error(str(e))
        return
    for rel, (target, acl) in CHECKED_IN.items():
        path = args.root / rel
        if not path.parent.is_dir():
            ap.error(f"{path.parent} does not exist: run this from the repository root or give --root")
        path.write_text(render_target(target, acl))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
