"""A provisioned fleet on a real Mosquitto: `edgetune provision` issues bundles for 3 devices;
over mutual TLS a bundled device works, one without a certificate is refused, one revoked while
connected gets nothing more after the broker's reload and cannot log in again (no restart), and
agents reject (and count) globals that are unsigned, signed by another key, or replayed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from broker import codec
from broker.messages import GlobalAdapter, RoundAnnouncement, TaskDefinition
from broker.signing import Signer
from broker.topics import Topics
from broker.transport import BrokerError, MqttTransport
from edge_agent.light import LightAgent
from edgetune.local_broker import free_port, start_fleet_broker
from edgetune.provision import Fleet

FLEET = "prov"
T = Topics(FLEET)
DEVICES = ("dev-1", "dev-2", "dev-3")


def read_env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """`edgetune provision init` + `device` through the CLI, and the broker it made, running."""
    root = tmp_path_factory.mktemp("fleet") / "fleet"
    tls_port, plain_port = free_port(), free_port()
    cli = [sys.executable, "-m", "edgetune.cli", "provision"]
    r = subprocess.run([*cli, "init", str(root), "--fleet", FLEET, "--broker-url", f"mqtts://127.0.0.1:{tls_port}",
                        "--host", "localhost", "--broker-files", str(root / "broker"), "--plain-port",
                        str(plain_port), "--persistence", str(root.parent / "mosquitto-data")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "device", str(root), *DEVICES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    broker = start_fleet_broker(root)
    yield root, broker
    broker.close()


def member(root, name: str) -> dict:
    """A bundle's connection settings, with the bundle's folder in place of the install dir."""
    folder = root / ("aggregator" if name == "aggregator" else f"devices/{name}")
    env = read_env(folder / ("aggregator.env" if name == "aggregator" else "agent.env"))
    return {k: v.replace("/etc/edgetune", str(folder)) for k, v in env.items()}


def transport(env: dict, client_id: str, *, cert: bool = True) -> MqttTransport:
    return MqttTransport(client_id, env["EDGETUNE_BROKER_URL"], username=env["EDGETUNE_MQTT_USERNAME"],
                         password=env["EDGETUNE_MQTT_PASSWORD"], ca_file=env["EDGETUNE_CA_FILE"],
                         cert_file=env["EDGETUNE_CERT_FILE"] if cert else None,
                         key_file=env["EDGETUNE_KEY_FILE"] if cert else None)


def _task() -> TaskDefinition:
    return TaskDefinition(mode="federated", model="m", model_hash="0" * 64, labels=["a", "b"], max_length=8,
                          lora_r=2, lora_alpha=4)


def wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_bundles_mutual_tls_revocation_and_signed_globals(fleet, tmp_path):
    root, broker = fleet
    # what the bundles hold
    for name in DEVICES:
        folder = root / "devices" / name
        assert {p.name for p in folder.iterdir()} >= {"ca.crt", "client.crt", "client.key", "fleet-keys.pem",
                                                       "agent.env", "edgetune-agent.service"}
        assert "ExecStart=" in (folder / "edgetune-agent.service").read_text()
        assert (folder / "client.key").stat().st_mode & 0o077 == 0
        env = read_env(folder / "agent.env")
        assert env["EDGETUNE_AGENT_ID"] == name and env["EDGETUNE_BROKER_URL"].startswith("mqtts://")
    conf = (root / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "crlfile" in conf

    agg_env = member(root, "aggregator")
    signer = Signer.from_file(agg_env["EDGETUNE_SIGNING_KEY"])
    agg = transport(agg_env, "agg")
    agg.connect(timeout=10)
    task = _task()
    tensors = {"w": np.zeros(4, np.float32)}

    def publish_global(version: int, signer_=signer, tensors_=tensors) -> bytes:
        g = GlobalAdapter(version=version, round=version, task_hash=task.hash, run_id="run-a")
        frame = codec.encode(g, tensors_, signer=signer_, context=T.global_adapter)
        agg.publish(T.global_adapter, frame, retain=True, wait=True)
        return frame

    agg.publish(T.task, codec.encode(task, signer=signer, context=T.task), retain=True, wait=True)
    first = publish_global(1)

    # a bundled device works: it takes the signed task and global
    env1 = member(root, "dev-1")
    a1 = LightAgent("dev-1", env1["EDGETUNE_BROKER_URL"], FLEET, username="dev-1",
                    password=env1["EDGETUNE_MQTT_PASSWORD"], ca_file=env1["EDGETUNE_CA_FILE"],
                    cert_file=env1["EDGETUNE_CERT_FILE"], key_file=env1["EDGETUNE_KEY_FILE"],
                    fleet_keys=env1["EDGETUNE_FLEET_KEYS"], state_dir=str(tmp_path))
    runner = threading.Thread(target=a1.run, daemon=True)
    runner.start()
    assert wait(lambda: a1.global_version == 1), a1.rejections
    assert a1.rejections == []

    # a device without a certificate is refused at the TLS handshake, though its password is right
    env3 = member(root, "dev-3")
    with pytest.raises(BrokerError, match="EDGETUNE_CERT_FILE"):
        transport(env3, "dev-3-nocert", cert=False).connect(timeout=3)
    assert "peer did not return a certificate" in broker.log.read_text()

    # dev-2, connected, is revoked: after the reload it gets nothing more and cannot log in again
    env2 = member(root, "dev-2")
    d2 = transport(env2, "dev-2")
    d2.subscribe(T.global_adapter)
    d2.connect(timeout=10)
    assert wait(lambda: d2.get(timeout=0.2) is not None)  # the retained global
    seen = len(broker.log.read_text())
    r = subprocess.run([sys.executable, "-m", "edgetune.cli", "provision", "revoke", str(root), "dev-2",
                        "--reload", str(broker.proc.pid)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait(lambda: not d2.connected, 10), "the broker kept the revoked device connected after the reload"
    publish_global(2)
    assert wait(lambda: a1.global_version == 2)
    assert d2.get(timeout=1.0) is None
    with pytest.raises(BrokerError):  # its certificate is in the reloaded CRL, its password gone
        transport(env2, f"dev-2-again-{uuid.uuid4().hex[:4]}").connect(timeout=3)
    assert "certificate verify failed" in broker.log.read_text()[seen:]  # the CRL, re-read on SIGHUP
    assert broker.proc.poll() is None  # the same broker all along

    # forged, unsigned and replayed globals: rejected by the agent and counted, the global kept
    forged = codec.encode(GlobalAdapter(version=3, round=3, task_hash=task.hash, run_id="run-a"),
                          {"w": np.ones(4, np.float32)}, signer=Signer.generate(), context=T.global_adapter)
    agg.publish(T.global_adapter, forged, retain=True, wait=True)
    agg.publish(T.global_adapter, codec.encode(GlobalAdapter(version=3, round=3, task_hash=task.hash),
                                                 {"w": np.ones(4, np.float32)}), retain=True, wait=True)
    agg.publish(T.global_adapter, first, retain=True, wait=True)  # a genuine frame, sent again
    # signed for the round topic, published on the global one
    wrong_topic = codec.encode(GlobalAdapter(version=3, round=3, task_hash=task.hash, run_id="run-a"), tensors,
                               signer=signer, context=T.round)
    agg.publish(T.global_adapter, wrong_topic, retain=True, wait=True)
    assert wait(lambda: len(a1.rejections) >= 4), a1.rejections
    assert [r for r, _ in a1.rejections] == ["unknown_key", "unsigned", "replayed", "bad_signature"]
    assert a1.global_version == 2 and float(np.asarray(a1.global_tensors["w"]).sum()) == 0.0

    # the agent's replay window outlives it: a new agent on the same state dir refuses the old frame
    a1.stop.set()
    runner.join(10)
    assert (tmp_path / "trust.json").exists()
    a1b = LightAgent("dev-1", env1["EDGETUNE_BROKER_URL"], FLEET, fleet_keys=env1["EDGETUNE_FLEET_KEYS"],
                     state_dir=str(tmp_path))
    with pytest.raises(Exception, match="replay"):
        a1b.verifier.check(T.global_adapter, "global", codec.decode(first, as_torch=False),
                           GlobalAdapter(version=1, round=1, task_hash=task.hash, run_id="run-a"))
    # a signed announcement of a new run is taken
    ann = RoundAnnouncement(round=1, selected=["dev-1"], deadline=time.time() + 5, global_version=2,
                            task_hash=task.hash, run_id="run-b")
    a1b.verifier.check(T.round, "round", codec.decode(codec.encode(ann, signer=signer, context=T.round),
                                                       as_torch=False), ann)
    for topic in (T.task, T.global_adapter):  # clear the retained frames for the next test
        agg.publish(topic, b"", retain=True, wait=True)
    agg.close()
    d2.close()


SERVE = ("import sys; sys.modules.update(dict.fromkeys(('torch', 'transformers', 'peft'))); "
         "from edge_agent.cli import app; app()")  # the serving device: torch, transformers, peft cannot import


def get_json(url: str) -> dict:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def test_a_torch_less_serving_device_takes_the_signed_model_and_keeps_it_on_a_bad_one(fleet, tmp_path):
    """A device provisioned while the broker runs (a reload lets it in) serves predictions without
    torch: it receives the aggregator's final model (signed int8 ONNX, over mutual TLS), verifies
    and swaps it in; a forged model and a signed but broken one are refused and the model stays."""
    import json
    import urllib.request

    from tests.conftest import ROOT, child_env, kill_all, spawn

    root, broker = fleet
    r = subprocess.run([sys.executable, "-m", "edgetune.cli", "provision", "device", str(root), "kiosk-9", "dev-4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    broker.proc.send_signal(__import__("signal").SIGHUP)  # the new devices' passwords
    time.sleep(0.5)
    serve_env, http = member(root, "kiosk-9"), free_port()
    serve_log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--http-port", str(http)], cwd=ROOT,
                              env=child_env(**serve_env, EDGETUNE_STATE_DIR=str(tmp_path / "kiosk")),
                              stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
    agg_env = member(root, "aggregator")
    agg_log = tmp_path / "agg.log"
    agg = spawn("aggregator.cli", ["run", "--rounds", "1", "--min-agents", "1", "--eval-limit", "16",
                                   "--output-dir", str(tmp_path / "agg")], agg_log,
                **agg_env, EDGETUNE_NUM_LAYERS="1", EDGETUNE_PUBLISH_MODEL="final", EDGETUNE_EVAL_WAIT_S="0")
    env4 = member(root, "dev-4")
    learner = LightAgent("dev-4", env4["EDGETUNE_BROKER_URL"], FLEET, username="dev-4",
                         password=env4["EDGETUNE_MQTT_PASSWORD"], ca_file=env4["EDGETUNE_CA_FILE"],
                         cert_file=env4["EDGETUNE_CERT_FILE"], key_file=env4["EDGETUNE_KEY_FILE"],
                         fleet_keys=env4["EDGETUNE_FLEET_KEYS"], state_dir=str(tmp_path / "dev-4"))
    threading.Thread(target=learner.run, daemon=True).start()
    try:
        assert wait(lambda: "in service" in serve_log.read_text() or agg.poll() is not None
                    or server.poll() is not None, 240), agg_log.read_text()[-3000:]
        assert "in service" in serve_log.read_text(), serve_log.read_text()[-3000:] + agg_log.read_text()[-3000:]
        assert learner.rejections == [] and learner.sent == 1
        assert set(learner.verifier.accepted) == {"keys", "task", "round", "global"}  # all signed
        health = get_json(f"http://127.0.0.1:{http}/healthz")
        assert health["model_version"] == 1 and health["labels"] == ["negative", "positive"], health
        req = urllib.request.Request(f"http://127.0.0.1:{http}/predict", json.dumps({"text": "great, thanks"}).encode(),
                                     {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["label"] in ("negative", "positive")
        current = (tmp_path / "kiosk" / "models" / "current").resolve()

        # a model signed by another key, then one signed by the fleet whose graph is garbage: both refused
        pub = transport(agg_env, "agg-test")
        pub.subscribe(T.status("kiosk-9"))
        pub.connect(timeout=10)
        from broker.messages import AgentStatus, parse

        st = parse(codec.decode(pub.get(timeout=5).payload).header, AgentStatus)  # retained: it serves v1
        assert (st.state.value, st.global_version) == ("serving", 1)
        signer = Signer.from_file(agg_env["EDGETUNE_SIGNING_KEY"])
        from broker.artifacts import pack
        from broker.messages import ModelArtifact

        files, tensors = pack(current, sorted(p.name for p in current.iterdir()))
        tensors = {**tensors, "model.int8.onnx": np.frombuffer(b"not an onnx graph" * 10, np.uint8)}
        import hashlib
        files = {**files, "model.int8.onnx": hashlib.sha256(tensors["model.int8.onnx"].tobytes()).hexdigest()}
        for key in (Signer.generate(), signer):
            msg = ModelArtifact(version=2, round=2, files=files, run_id="x")
            pub.publish(T.model, codec.encode(msg, tensors, signer=key, context=T.model), wait=True)
        assert wait(lambda: serve_log.read_text().count("rejected (") >= 2, 30), serve_log.read_text()[-3000:]
        text = serve_log.read_text()
        assert "rejected (unknown_key)" in text and "rejected (bad_model)" in text, text[-3000:]
        assert (tmp_path / "kiosk" / "models" / "current").resolve() == current
        assert get_json(f"http://127.0.0.1:{http}/healthz")["model_version"] == 1
        assert [p.name for p in (tmp_path / "kiosk" / "models").iterdir() if p.name.endswith(".incoming")] == []
        for topic in (T.task, T.round, T.global_adapter, T.keys):  # the finished run's retained frames
            pub.publish(topic, b"", retain=True, wait=True)
        pub.close()
    finally:
        learner.stop.set()
        server.terminate()
        agg.terminate()
        for p in (server, agg):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
        kill_all([server, agg])


def test_an_agent_whose_fleet_keys_are_missing_stops_at_start_up_saying_where(tmp_path):
    from tests.conftest import ROOT, child_env

    r = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--broker", "mqtt://127.0.0.1:9"], cwd=ROOT,
                       env=child_env(EDGETUNE_FLEET_KEYS=str(tmp_path / "nowhere.pem")), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "nowhere.pem do not exist" in r.stderr and "EDGETUNE_FLEET_KEYS" in r.stderr and "Traceback" not in r.stderr


def test_a_signing_key_rotates_over_the_wire_without_touching_the_devices(fleet, tmp_path):
    """`rotate-key`: the aggregator, still signing with the current key, publishes both keys and the
    agent adopts them; after `--finish` it signs with the next key and publishes it alone: the agent
    drops the old key, and remembers that across a restart, whatever its bundle's file says."""
    root, broker = fleet
    env = member(root, "dev-3")
    bundle_keys = tmp_path / "bundle-keys.pem"  # the device's file as provisioned, before any rotation
    bundle_keys.write_bytes((root / "devices" / "dev-3" / "fleet-keys.pem").read_bytes())
    agent = LightAgent("dev-3", env["EDGETUNE_BROKER_URL"], FLEET, username="dev-3",
                       password=env["EDGETUNE_MQTT_PASSWORD"], ca_file=env["EDGETUNE_CA_FILE"],
                       cert_file=env["EDGETUNE_CERT_FILE"], key_file=env["EDGETUNE_KEY_FILE"],
                       fleet_keys=str(bundle_keys), state_dir=str(tmp_path / "state"))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    agg = transport(member(root, "aggregator"), "agg-rotate")
    agg.connect(timeout=10)
    from broker.messages import FleetKeys
    from broker.signing import Keyring

    def publish_keys() -> Signer:
        """What the aggregator does at start with its bundle (EDGETUNE_SIGNING_KEY, EDGETUNE_FLEET_KEYS)."""
        signer = Signer.from_file(root / "aggregator" / "signing.key")
        msg = FleetKeys(keys=Keyring.from_file(root / "aggregator" / "fleet-keys.pem").pems())
        agg.publish(T.keys, codec.encode(msg, signer=signer, context=T.keys), retain=True, wait=True)
        return signer

    def publish_global(signer: Signer, version: int) -> None:
        g = GlobalAdapter(version=version, round=version, run_id="rot")
        agg.publish(T.global_adapter, codec.encode(g, {"w": np.full(4, version, np.float32)}, signer=signer,
                                                   context=T.global_adapter), retain=True, wait=True)

    old = Signer.from_file(root / "signing.key")
    Fleet.open(root).rotate_key()  # `edgetune provision rotate-key` (the CLI's other commands run above)
    assert publish_keys().key_id == old.key_id  # still the current key during the rotation
    assert wait(lambda: len(agent.verifier.keyring.keys) == 2), agent.rejections
    nxt = Signer.from_file(root / "signing.key.next")
    publish_global(nxt, 1)  # the next key is trusted already
    assert wait(lambda: agent.global_version == 1), agent.rejections

    Fleet.open(root).rotate_key(finish=True)
    assert publish_keys().key_id == nxt.key_id
    assert wait(lambda: list(agent.verifier.keyring.keys) == [nxt.key_id]), agent.rejections
    publish_global(old, 2)  # the retired key: refused
    assert wait(lambda: [r for r, _ in agent.rejections] == ["unknown_key"]), agent.rejections
    assert agent.global_version == 1
    agent.stop.set()
    runner.join(10)
    again = LightAgent("dev-3", env["EDGETUNE_BROKER_URL"], FLEET, fleet_keys=str(bundle_keys),
                       state_dir=str(tmp_path / "state"))
    assert list(again.verifier.keyring.keys) == [nxt.key_id]  # trust.json, not the bundle's old file
    for topic in (T.keys, T.global_adapter):
        agg.publish(topic, b"", retain=True, wait=True)
    agg.close()


def test_the_provision_commands_renew_list_rotate_and_refuse_what_cannot_be_done(tmp_path):
    """In process (typer's runner): renewal gives a new certificate and keeps the password, `list`
    shows every device, and mistakes exit 2 with one line that says what to do."""
    from typer.testing import CliRunner

    from edgetune.provision_cli import provision_app

    run = lambda *a: CliRunner().invoke(provision_app, [str(x) for x in a])  # noqa: E731
    root = tmp_path / "f"
    assert run("init", root, "--fleet", "f", "--broker-url", "mqtt://b:1883").exit_code == 2  # not TLS
    assert run("init", root, "--fleet", "f", "--broker-url", "mqtts://b:8883").exit_code == 0
    r = run("init", root, "--fleet", "f", "--broker-url", "mqtts://b:8883")
    assert r.exit_code == 2 and "already holds a fleet" in r.output
    assert run("device", root, "a-1", "a-2").exit_code == 0
    r = run("device", root, "a-1")
    assert r.exit_code == 2 and "renew" in r.output
    assert run("device", root, "aggregator").exit_code == 2 and run("device", root, "bad/name").exit_code == 2
    before = (root / "devices/a-1/client.crt").read_bytes(), (root / "devices/a-1/agent.env").read_bytes()
    r = run("renew", root, "--within", "10000")
    assert r.exit_code == 0 and "renewed a-1" in r.output and "renewed a-2" in r.output
    assert (root / "devices/a-1/client.crt").read_bytes() != before[0]
    assert (root / "devices/a-1/agent.env").read_bytes() == before[1]  # same password
    assert run("revoke", root, "a-2").exit_code == 0
    r = run("revoke", root, "a-2")
    assert r.exit_code == 2 and "already revoked" in r.output
    assert run("revoke", root, "nobody").exit_code == 2
    assert "a-2:" not in (root / "broker/passwd").read_text() and "a-1:" in (root / "broker/passwd").read_text()
    r = run("list", root)
    assert "a-1" in r.output and "active" in r.output and "REVOKED" in r.output
    r = run("rotate-key", root, "--finish")
    assert r.exit_code == 2 and "no rotation" in r.output
    assert run("rotate-key", root).exit_code == 0
    r = run("rotate-key", root)
    assert r.exit_code == 2 and "under way" in r.output
    assert run("rotate-key", root, "--finish").exit_code == 0
    assert (root / "devices/a-1/fleet-keys.pem").read_bytes() == (root / "fleet-keys.pem").read_bytes()
    assert run("list", tmp_path / "nowhere").exit_code == 2
