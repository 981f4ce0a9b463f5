"""A broker on this machine for the one-machine runner and the tests.

`start_local_broker()` starts the mosquitto binary (PATH or /usr/sbin) with the project's
mosquitto.conf on a free loopback port; where there is none, it falls back to amqtt, an
in-process Python broker (MQTT 3.1.1 only, about 36 MB/s against Mosquitto's 200+ MB/s), run in
a child process. Tests use `start_mosquitto()`, which never falls back.
"""

from __future__ import annotations

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

CONF = Path(__file__).resolve().parent / "mosquitto.conf"


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
    """The project's config with this listener port and persistence folder."""
    lines = []
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
    proc = subprocess.Popen([sys.executable, "-m", "broker.local", "--amqtt", str(port)],
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
