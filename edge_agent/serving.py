"""A device that only serves predictions: no torch, no training.

It takes each new model the aggregator publishes on the fleet's model topic (a signed int8 ONNX
folder, broker.messages.ModelArtifact), verifies it, and swaps it in atomically:

1. the frame's signature against the fleet's keys (broker.signing: unsigned, foreign, altered
   or replayed frames are refused), then each file's sha256 against the signed list;
2. the files are written to a new folder under STATE_DIR/models/, loaded with ONNX Runtime and
   asked one prediction; only then does the `current` link (STATE_DIR/models/current) move to
   it, by a rename, and the model in service change. On any failure the folder is removed and
   the model in service stays; the refusal is logged and counted (rejected_messages{reason}).

A restart serves `current` again. Predictions (and feedback into the sample store) go through
the loopback HTTP API (edge_agent.http_api). Needs only the `serve` extra: onnxruntime,
tokenizers, paho-mqtt, cryptography.
"""

from __future__ import annotations

import logging
import os
import shutil
import re
import threading
from pathlib import Path
from typing import Optional

import typer

from broker import codec
from broker.artifacts import ArtifactError, unpack
from broker.errors import WireError
from broker.messages import AgentState, AgentStatus, ModelArtifact, parse
from broker.signing import Keyring, Verifier
from broker.topics import Topics
from broker.transport import Will

log = logging.getLogger("edgetune.serve")

CURRENT = "current"  # STATE_DIR/models/current: a link to the folder in service
PROBE_TEXT = "a probe prediction before the model goes into service"


def point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target`, atomically (a new link renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


class ServingAgent:
    """Subscribes to the fleet's model topic; verifies, unpacks, loads and swaps each model."""

    def __init__(self, agent_id: str, fleet: str, connection, state_dir: str | Path, fleet_keys: str, *,
                 metrics=None, threads: int | None = None) -> None:
        from edge_agent.inference import ModelSlot, OnnxPredictor

        self.id = agent_id
        self.topics = Topics(fleet)
        self.models = Path(state_dir).expanduser() / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.verifier = Verifier(Keyring.from_file(fleet_keys), Path(state_dir).expanduser() / "trust.json")
        self.metrics = metrics
        self.load = lambda d: OnnxPredictor(d, threads=threads)
        self.slot = ModelSlot(loader=self.load)
        self.version = -1  # the global the model in service was made from
        self.rejections: list[tuple[str, str]] = []
        self.swapped = threading.Event()  # set after each model goes into service
        self.stop = threading.Event()
        current = self.models / CURRENT
        if current.exists():
            try:
                self.slot.install(current.resolve())
                m = re.match(r"v(\d+)-", current.resolve().name)
                self.version = int(m.group(1)) if m else -1
                log.info("serving %s", current.resolve())
            except Exception as e:  # a broken folder on disk: serve nothing until a new model comes
                log.warning("cannot serve %s (%s); waiting for the next model", current.resolve(), e)
        self.transport = connection.transport(
            f"edgetune-serve-{agent_id}", will=Will(self.topics.status(agent_id), self._status(AgentState.offline)))
        self.transport.subscribe(self.topics.model)

    def _in_service(self, folder: Path) -> bool:
        current = self.models / CURRENT
        return current.exists() and current.resolve() == folder.resolve()

    def _status(self, state: AgentState) -> bytes:
        return codec.encode(AgentStatus(agent_id=self.id, state=state, global_version=self.version))

    def rejected(self, reason: str, msg: str) -> None:
        self.rejections.append((reason, msg))
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected (%s): %s", reason, msg)

    def take(self, topic: str, payload: bytes) -> bool:
        """One model frame: True if it went into service."""
        staging = None
        try:
            frame = codec.decode(payload, as_torch=False)
            header = parse(frame.header, ModelArtifact)
            self.verifier.check(topic, "model", frame, header)
            final = self.models / f"v{header.version:06d}-{header.files[sorted(header.files)[0]][:8]}"
            if self._in_service(final):  # the same model again (a QoS 1 redelivery): nothing to do
                return True
            staging = final.with_name(final.name + ".incoming")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                unpack(frame.tensors, header.files, staging)
            except ArtifactError as e:
                raise ArtifactError(f"model v{header.version}: {e}") from None
            had = self.slot.current_dir is not None
            self.load(staging).predict([PROBE_TEXT])  # ONNX Runtime loads it and predicts, or this fails
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            staging = None
            point(self.models / CURRENT, final)
            self.slot.install(final)
            self.version = header.version
            log.info("model v%d (round %d) in service%s: %s", header.version, header.round,
                     "" if had else " (the first)", final)
            self.transport.publish(self.topics.status(self.id), self._status(AgentState.serving), retain=True)
            self.swapped.set()
            return True
        except WireError as e:
            self.rejected(e.reason, f"{topic}: {e}")
        except Exception as e:  # it did not load or predict: the model in service stays
            self.rejected("bad_model", f"{topic}: the new model does not load or predict ({type(e).__name__}: {e}); "
                                       "kept the model in service")
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return False

    def run(self) -> None:
        self.transport.connect()
        self.transport.publish(self.topics.status(self.id), self._status(AgentState.serving), retain=True)
        while not self.stop.is_set():
            m = self.transport.get(timeout=0.5)
            if m is not None and m.payload:
                self.take(m.topic, m.payload)
        self.transport.close(final=(self.topics.status(self.id), self._status(AgentState.offline)))



def serve_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="settings file (.json/.toml/.yaml)"),
    agent_id: Optional[str] = typer.Option(None, "--id", help="this device's id (its MQTT username)"),
    broker: Optional[str] = typer.Option(None, help="mqtt(s)://host:port"),
    fleet: Optional[str] = typer.Option(None),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="where models are kept (EDGETUNE_STATE_DIR)"),
    fleet_keys: Optional[Path] = typer.Option(None, "--fleet-keys", help="the fleet's public keys (the bundle's "
                                              "fleet-keys.pem; EDGETUNE_FLEET_KEYS)"),
    http_port: Optional[int] = typer.Option(None, "--http-port", help="loopback predict API (0: any free port)"),
    metrics_port: Optional[int] = typer.Option(None),
) -> None:
    """Serve predictions with the fleet's newest model, without training (no torch): each model the
    aggregator publishes (EDGETUNE_PUBLISH_MODEL) is verified against the fleet's keys and swapped in."""
    import signal

    from broker.signing import KeyFileError
    from broker.transport import BrokerError
    from common.cli import EXIT_INPUT, cli_settings, exit_codes, fail
    from common.logs import setup_logging
    from edge_agent.settings import AgentSettings

    s = cli_settings(AgentSettings, config, agent_id=agent_id, broker_url=broker, fleet=fleet,
                     state_dir=str(state_dir) if state_dir else None, fleet_keys=str(fleet_keys) if fleet_keys else None,
                     http_port=http_port, metrics_port=metrics_port)
    if not s.state_dir:
        fail("serve keeps its models in a state dir: set EDGETUNE_STATE_DIR or --state-dir", EXIT_INPUT)
    if not s.fleet_keys:
        fail("serve takes only signed models: set EDGETUNE_FLEET_KEYS or --fleet-keys to the fleet-keys.pem of this "
             "device's bundle (`edgetune provision device`)", EXIT_INPUT)
    setup_logging(s.log_level, s.agent_id)
    from edge_agent.metrics import AgentMetrics, serve

    metrics = AgentMetrics()
    metrics.info(fleet=s.fleet, agent=s.agent_id, mode="serve")
    with exit_codes({BrokerError: 3, KeyFileError: EXIT_INPUT}):
        agent = ServingAgent(s.agent_id, s.fleet, s, s.state_dir, s.fleet_keys, metrics=metrics,
                             threads=s.onnx_threads or None)
        if s.metrics_port is not None:
            serve(metrics.registry, s.metrics_port, s.metrics_addr)
        if s.http_port is not None:
            from edge_agent.http_api import make_server

            http = make_server(agent.slot, None, port=s.http_port, metrics=metrics).start()
            log.info("predict API on %s", http.url)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: agent.stop.set())
        agent.run()
