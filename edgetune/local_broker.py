"""A broker on this machine for the one-machine runner and the tests.

`start_local_broker()` starts the mosquitto binary (PATH or /usr/sbin) with the project's
mosquitto.conf on a free loopback port; where there is none, it falls back to amqtt, an
in-process Python broker (MQTT 3.1.1 only, about 36 MB/s against Mosquitto's 200+ MB/s), run in
a child process. Tests use `start_mosquitto()`, which never falls back.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import broker

CONF = Path(broker.__file__).resolve().parent / "mosquitto.conf"


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


def render_conf(port: int, data_dir: Path, base: Path = CONF, extra: str = "") -> str:
    """The project's config with this listener port and persistence folder.

    Started as root, mosquitto drops to the `mosquitto` user and then cannot write its
    persistence file in our folder (sessions and queued messages would not survive a restart):
    run it as the user who owns the folder.
    """
    lines = [f"user {getpass.getuser()}"]
    for line in base.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "persistence_location":
            line = f"persistence_location {data_dir}/"
        lines.append(line)
    return "\n".join(lines) + "\n" + extra


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


def start_mosquitto(port: int | None = None, workdir: Path | None = None, *, conf: Path = CONF,
                    extra_conf: str = "", timeout: float = 10) -> LocalBroker:
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerUnavailable(
            "mosquitto is not installed: `sudo apt-get install mosquitto` (Debian/Ubuntu), or run scripts/install"
        )
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="edgetune-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(render_conf(port, workdir, conf, extra_conf))
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(conf_path)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _wait_port(port, proc, timeout, log)
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


def start_local_broker(workdir: Path | None = None) -> LocalBroker:
    if mosquitto_binary():
        return start_mosquitto(workdir=workdir)
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


# -- the secure broker: passwords, ACL, TLS (broker/mosquitto-secure.conf) --------------------

SECURE_CONF = Path(broker.__file__).resolve().parent / "mosquitto-secure.conf"


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


def render_secure_conf(port: int, tls_port: int | None, workdir: Path, *, password_file: Path, acl_file: Path,
                       cafile: Path | None = None, certfile: Path | None = None, keyfile: Path | None = None,
                       base: Path = SECURE_CONF, extra: str = "") -> str:
    """The secure config with loopback ports and this folder's files.

    The first listener becomes `listener <port> 127.0.0.1`; the second (TLS, the file's last
    block) `listener <tls_port> 127.0.0.1`, or is left out with its options when tls_port is None.
    File options are replaced by name; `user` is set to whoever runs this (as root, Mosquitto
    would otherwise switch to a `mosquitto` user that cannot read 0600 files of ours).
    """
    import pwd

    files = {"password_file": password_file, "acl_file": acl_file, "persistence_location": f"{workdir}/",
             "cafile": cafile, "certfile": certfile, "keyfile": keyfile}
    lines: list[str] = []
    listeners = 0
    skipping = False
    for line in base.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            listeners += 1
            if listeners == 1:  # global additions go above the first listener's comment block
                at = len(lines)
                while at and (not lines[at - 1].strip() or lines[at - 1].lstrip().startswith("#")):
                    at -= 1
                lines[at:at] = [f"user {pwd.getpwuid(os.getuid()).pw_name}"] + ([extra.rstrip("\n")] if extra else [])
                line = f"listener {port} 127.0.0.1"
            elif listeners == 2:
                skipping = tls_port is None
                line = f"listener {tls_port} 127.0.0.1"
            else:
                raise ValueError(f"{base}: expected two listeners (plain, then TLS), found more")
        elif key in files:
            if files[key] is None and not skipping:
                raise ValueError(f"{base}: {key} needs a file, none was given")
            line = f"{key} {files[key]}"
        if not skipping:
            lines.append(line)
    if listeners < 1 + (tls_port is not None):
        raise ValueError(f"{base}: expected a plain and a TLS listener, found {listeners}")
    return "\n".join(lines) + "\n"


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


def start_secure_mosquitto(workdir: Path, users: dict[str, str], acl_text: str, tls: bool = True, *,
                           port: int | None = None, tls_port: int | None = None, conf: Path = SECURE_CONF,
                           hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), extra_conf: str = "",
                           timeout: float = 10) -> SecureBroker:
    """Mosquitto with mosquitto-secure.conf on free loopback ports: `users` (name -> password)
    in a password file, `acl_text` as the ACL (deploy/mosquitto/acl is the project's), and with
    tls a test CA and server certificate (edgetune.dev_tls) for `hosts` in workdir/certs."""
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerUnavailable(
            "mosquitto is not installed: `sudo apt-get install mosquitto` (Debian/Ubuntu), or run scripts/install"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_password_file(workdir / "passwd", users)
    acl = workdir / "acl"
    acl.write_text(acl_text)
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
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(render_secure_conf(
        port, tls_port, workdir, password_file=passwd, acl_file=acl, base=conf, extra=extra_conf,
        cafile=certs.ca_cert if certs else None, certfile=certs.server_cert if certs else None,
        keyfile=certs.server_key if certs else None))
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(conf_path)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _wait_port(port, proc, timeout, log)
    if tls_port is not None:
        _wait_port(tls_port, proc, timeout, log)
    return SecureBroker(port, proc, "mosquitto", workdir, conf_path, log, False, tls_port=tls_port,
                        ca_file=certs.ca_cert if certs else None)
