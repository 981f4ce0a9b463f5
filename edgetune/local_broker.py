"""A broker on this machine for the one-machine runner, the tests and the benches.

`start_local_broker()` starts the mosquitto binary (PATH or /usr/sbin) with the project's
configuration (broker.mosquitto_conf, target "local", rendered at start) on a free loopback
port; where there is none, it falls back to amqtt, an in-process Python broker (MQTT 3.1.1 only,
about 36 MB/s against Mosquitto's 200+ MB/s), run in a child process. Tests use
`start_mosquitto()`, which never falls back, and `start_secure_mosquitto()` (target "secure":
passwords, the ACL and a TLS listener with test certificates from edgetune.dev_tls).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.mosquitto_conf import (ROUND_AGENTS, TlsFiles, local_options, render_acl, render_mosquitto_conf,
                                   secure_options)
from broker.transport import DEFAULT_MAX_PACKET_BYTES, BrokerAddress


class BrokerUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable(f"broker exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise BrokerUnavailable(f"broker did not open port {port} within {timeout}s")


def _me() -> str:
    """Who runs this. Mosquitto runs as this user: started as root it would otherwise switch to
    a `mosquitto` user that can neither write our persistence folder nor read our 0600 files."""
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass
class LocalBroker:
    port: int
    proc: subprocess.Popen
    kind: str  # "mosquitto" or "amqtt"
    workdir: Path
    conf: Path | None = None
    log: Path | None = None
    _owned_tmp: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def mqtt_protocol(self) -> int:
        return 5 if self.kind == "mosquitto" else 4

    def stop(self, *, hard: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, timeout: float = 10) -> None:
        """Stop and start again on the same port with the same persistence folder."""
        self.stop()
        assert self.conf is not None, "only mosquitto brokers restart"
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, timeout, self.log)

    def close(self) -> None:
        self.stop()
        if self._owned_tmp:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _need_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerUnavailable(
            "mosquitto is not installed: `sudo apt-get install mosquitto` (Debian/Ubuntu), or run scripts/install"
        )
    return binary


def _launch(binary: str, workdir: Path, conf: str, ports: list[int | None],
            timeout: float) -> tuple[subprocess.Popen, Path, Path]:
    """Write workdir/mosquitto.conf, start mosquitto with it and wait for each port."""
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(conf)
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(conf_path)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    for port in ports:
        if port is not None:
            _wait_port(port, proc, timeout, log)
    return proc, conf_path, log


def start_mosquitto(port: int | None = None, workdir: Path | None = None, *,
                    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES, extra_conf: str = "",
                    round_agents: int = ROUND_AGENTS, timeout: float = 10) -> LocalBroker:
    """Mosquitto with the "local" config (anonymous, loopback) on `port` (default: a free one),
    its persistence in `workdir` (default: a temporary folder removed by close()), its queues sized
    for rounds of `round_agents` (broker.mosquitto_conf.QueueSizing)."""
    binary = _need_mosquitto()
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="edgetune-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = render_mosquitto_conf(local_options(
        port, f"{workdir}/", max_packet_bytes=max_packet_bytes, user=_me(), extra=extra_conf, round_agents=round_agents))
    proc, conf_path, log = _launch(binary, workdir, conf, [port], timeout)
    return LocalBroker(port, proc, "mosquitto", workdir, conf_path, log, owned)


def start_amqtt(port: int | None = None, workdir: Path | None = None, timeout: float = 20) -> LocalBroker:
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="edgetune-amqtt-"))
    port = port or free_port()
    log = workdir / "amqtt.log"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.local_broker", "--amqtt", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _wait_port(port, proc, timeout, log)
    return LocalBroker(port, proc, "amqtt", workdir, None, log, owned)


def start_local_broker(workdir: Path | None = None, max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> LocalBroker:
    """Mosquitto where there is one (its max_packet_size: max_packet_bytes), else amqtt."""
    if mosquitto_binary():
        return start_mosquitto(workdir=workdir, max_packet_bytes=max_packet_bytes)
    try:
        import amqtt  # noqa: F401
    except ImportError:
        raise BrokerUnavailable(
            "no broker to embed: install mosquitto (`sudo apt-get install mosquitto`) or amqtt "
            "(`pip install amqtt`), or pass --broker mqtt://host:port"
        ) from None
    return start_amqtt(workdir=workdir)


def _run_amqtt(port: int) -> None:  # pragma: no cover - runs in the child process
    import asyncio

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        while True:
            await asyncio.sleep(3600)

    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "--amqtt":
        _run_amqtt(int(sys.argv[2]))


# -- the secure broker: passwords, ACL, TLS (broker.mosquitto_conf.secure_options) ------------


@dataclass
class SecureBroker(LocalBroker):
    """A mosquitto with the secure config: `url` is the loopback plain listener, `tls_url` the TLS one."""

    tls_port: int | None = None
    ca_file: Path | None = None  # the CA that signed the broker's certificate (clients: EDGETUNE_CA_FILE)

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise BrokerUnavailable("this broker was started without its TLS listener (tls=False)")
        return f"mqtts://127.0.0.1:{self.tls_port}"


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by `mosquitto_passwd -b` (hashed; mode 0600)."""
    tool = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd") if os.access(p, os.X_OK)), None)
    if tool is None:
        raise BrokerUnavailable("mosquitto_passwd is not installed: `sudo apt-get install mosquitto` (Debian/Ubuntu)")
    if not users:
        raise ValueError("a password file needs at least one user")
    path = Path(path)
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        r = subprocess.run([tool, "-b", *(["-c"] if i == 0 else []), str(path), user, password],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise BrokerUnavailable(f"mosquitto_passwd failed for user {user!r}: {(r.stderr or r.stdout).strip()}")
    path.chmod(0o600)
    return path


def start_fleet_broker(fleet_root: Path, timeout: float = 10) -> SecureBroker:
    """Mosquitto with a provisioned fleet's broker files (edgetune.provision: made with
    broker_files = FLEET/broker, so the config points at them in place), run as this user."""
    from edgetune.provision import Fleet

    f = Fleet.open(fleet_root)
    broker = Path(fleet_root) / "broker"
    conf = (broker / "mosquitto.conf").read_text()
    workdir = broker / "run"  # this run's config (with a `user` line) and log
    workdir.mkdir(exist_ok=True)
    tls_port = BrokerAddress.parse(f.data["broker_url"]).port
    proc, conf_path, log = _launch(_need_mosquitto(), workdir, f"user {_me()}\n" + conf,
                                   [f.data["plain_port"], tls_port], timeout)
    return SecureBroker(f.data["plain_port"], proc, "mosquitto", workdir, conf_path, log, False, tls_port=tls_port,
                        ca_file=broker / "certs" / "ca.crt")


def start_secure_mosquitto(workdir: Path, users: dict[str, str], acl_text: str | None = None, tls: bool = True, *,
                           port: int | None = None, tls_port: int | None = None,
                           hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                           max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES, extra_conf: str = "",
                           timeout: float = 10) -> SecureBroker:
    """Mosquitto with the "secure" config on free loopback ports: `users` (name -> password) in a
    password file, `acl_text` as the ACL (default: the project's, broker.mosquitto_conf.render_acl),
    and with tls a test CA and server certificate (edgetune.dev_tls) for `hosts` in workdir/certs."""
    binary = _need_mosquitto()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_password_file(workdir / "passwd", users)
    acl = workdir / "acl"
    acl.write_text(render_acl() if acl_text is None else acl_text)
    acl.chmod(0o600)
    certs = None
    if tls:
        from edgetune.dev_tls import make_test_certs

        certs = make_test_certs(workdir / "certs", hosts)
        tls_port = tls_port or free_port()
    else:
        tls_port = None
    port = port or free_port()
    while tls_port == port:
        tls_port = free_port()
    options = secure_options(
        port, tls_port, password_file=str(passwd), acl_file=str(acl), persistence_location=f"{workdir}/",
        certs=TlsFiles(str(certs.ca_cert), str(certs.server_cert), str(certs.server_key)) if certs else None,
        max_packet_bytes=max_packet_bytes, user=_me(), extra=extra_conf)
    proc, conf_path, log = _launch(binary, workdir, render_mosquitto_conf(options), [port, tls_port], timeout)
    return SecureBroker(port, proc, "mosquitto", workdir, conf_path, log, False, tls_port=tls_port,
                        ca_file=certs.ca_cert if certs else None)
