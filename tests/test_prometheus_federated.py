"""A short federated run, as the dashboard sees it: the real aggregator and two real agents
(processes, MiniLM, real Mosquitto) expose /metrics, a real Prometheus (Debian's package) scrapes
all three every second, and every expression of the Grafana dashboard must return data through
Prometheus's HTTP API, with the run's numbers right.

The aggregator stops serving /metrics a few milliseconds after its last round completes (it
announces the end of the run and exits), which no scrape interval catches. So the aggregator talks
to Mosquitto through a small TCP proxy in this file that holds back its final round announcement
(the run's last packet) until the queries are done: while it is held, the aggregator waits for the
broker's acknowledgement and the agents wait for the end of the run, all three still up and
connected, with their last round counted. Released, everyone finishes normally.
"""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import threading
import time

import pytest

from broker import codec
from broker.topics import Topics
from tests.conftest import finish_all, spawn
from tests.deploy_support import free_port, need_executable, run_prometheus
from tests.test_deploy_metrics_promtool import PROMETHEUS_HINT, _dashboard_exprs

ROUNDS = 2
AGENTS = 2
FLEET = "promtest"

# Expressions that cannot have data after a federated classification run, with the reason. A
# histogram with no observations has all its bucket rates at 0, and histogram_quantile of that is
# NaN: Prometheus answers a series, Grafana draws nothing.
EXPECTED_WITHOUT_DATA = {
    'histogram_quantile(0.5, sum by (le) (rate(edgetune_agent_predict_seconds_bucket[1m]) * on(instance) group_left(fleet, agent) edgetune_agent_build_info{fleet=~".*", agent=~".*"}))':
        "no prediction is served during a training run (edgetune_agent_predict_seconds has no observations)",
    'histogram_quantile(0.95, sum by (le) (rate(edgetune_agent_predict_seconds_bucket[1m]) * on(instance) group_left(fleet, agent) edgetune_agent_build_info{fleet=~".*", agent=~".*"}))':
        "no prediction is served during a training run (edgetune_agent_predict_seconds has no observations)",
    'histogram_quantile(0.5, sum by (fleet, le) (rate(edgetune_aggregator_split_step_seconds_bucket[1m]) * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}))':
        "split learning only (edgetune_aggregator_split_step_seconds has no observations in a federated run)",
    'histogram_quantile(0.95, sum by (fleet, le) (rate(edgetune_aggregator_split_step_seconds_bucket[1m]) * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}))':
        "split learning only (edgetune_aggregator_split_step_seconds has no observations in a federated run)",
    'histogram_quantile(0.95, sum by (agent, le) (rate(edgetune_agent_split_round_trip_seconds_bucket[1m]) * on(instance) group_left(fleet, agent) edgetune_agent_build_info{fleet=~".*", agent=~".*"}))':
        "split learning only (edgetune_agent_split_round_trip_seconds has no observations in a federated run)",
    'histogram_quantile(0.5, sum by (fleet, le) (rate(edgetune_aggregator_split_microbatch_agents_bucket[1m]) * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}))':
        "split learning only (edgetune_aggregator_split_microbatch_agents has no observations in a federated run)",
    'histogram_quantile(0.95, sum by (fleet, le) (rate(edgetune_aggregator_split_microbatch_agents_bucket[1m]) * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}))':
        "split learning only (edgetune_aggregator_split_microbatch_agents has no observations in a federated run)",
    'edgetune_aggregator_dp_epsilon * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}':
        "differential privacy only (strategy dp_fedavg): epsilon stays NaN in a run without DP",
    'histogram_quantile(0.95, sum by (fleet, le) (rate(edgetune_aggregator_update_staleness_versions_bucket[5m]) * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}))':
        "async aggregation only (edgetune_aggregator_update_staleness_versions has no observations in sync rounds)",
    'edgetune_agent_serving_holdout_accuracy * on(instance) group_left(fleet, agent) edgetune_agent_build_info{fleet=~".*", agent=~".*"}':
        "agents with a state dir only: no model is exported and swapped in during this run, so it stays NaN",
    'edgetune_aggregator_global_perplexity * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}':
        "split learning only: perplexity stays NaN (not a made-up 0) while a classifier is trained",
    'edgetune_aggregator_eval_perplexity * on(instance) group_left(fleet) edgetune_aggregator_build_info{fleet=~".*"}':
        "split learning only: perplexity stays NaN for both sources (central, federated) while a classifier is trained",
}


def _varint(buf: bytes | bytearray, i: int) -> tuple[int, int] | None:
    """An MQTT variable byte integer at buf[i:]: (value, next index), or None if incomplete."""
    value, shift = 0, 0
    for k in range(4):
        if i + k >= len(buf):
            return None
        b = buf[i + k]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i + k + 1
        shift += 7
    raise ValueError("malformed MQTT remaining length")


class HoldFinalAnnouncement:
    """A TCP proxy in front of the broker that forwards everything, except that it holds back a
    client's PUBLISH of the final round announcement (and whatever that client sends after it)
    until `release` is set. `held` is set when it holds one."""

    def __init__(self, upstream_port: int, round_topic: str) -> None:
        self.upstream_port, self.round_topic = upstream_port, round_topic.encode()
        self.held, self.release = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [client, upstream]
            threading.Thread(target=self._to_client, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._to_broker, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _to_client(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _to_broker(self, src: socket.socket, dst: socket.socket) -> None:
        buf, mqtt5 = bytearray(), False
        try:
            while data := src.recv(65536):
                buf += data
                while (head := _varint(buf, 1)) is not None and len(buf) >= head[1] + head[0]:
                    end = head[1] + head[0]
                    packet, body = bytes(buf[:end]), bytes(buf[head[1] : end])
                    del buf[:end]
                    kind = packet[0] >> 4
                    if kind == 1:  # CONNECT: protocol name, then the protocol level (5: MQTT 5)
                        mqtt5 = body[2 + int.from_bytes(body[:2], "big")] == 5
                    elif kind == 3 and not self.held.is_set() and self._is_final(packet[0], body, mqtt5):
                        self.held.set()
                        self.release.wait()
                    dst.sendall(packet)
        except OSError:
            pass
        finally:
            dst.close()

    def _is_final(self, flags: int, body: bytes, mqtt5: bool) -> bool:
        n = int.from_bytes(body[:2], "big")
        if body[2 : 2 + n] != self.round_topic:
            return False
        i = 2 + n + (2 if (flags >> 1) & 3 else 0)  # the packet id, at QoS 1 and 2
        if mqtt5:
            plen, i = _varint(body, i)
            i += plen
        try:
            return bool(codec.decode(body[i:], as_torch=False).header.get("final"))
        except Exception:  # not a frame: not the final announcement (the aggregator's checks say the rest)
            return False

    def close(self) -> None:
        self.release.set()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def _values(result: list) -> dict[str, float]:
    """instance -> value of an instant query's series."""
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}


def _tails(logs) -> str:
    return "\n".join(f"--- {lg.name}\n{lg.read_text(errors='replace')[-1500:]}" for lg in logs)


def _check_alive(procs, logs) -> None:
    for p, log in zip(procs, logs):
        if p.poll() is not None:
            pytest.fail(f"{log.name} exited {p.returncode} before the run's end was held:\n{log.read_text()[-3000:]}")


def _wait_for(prom, expr: str, ok, timeout: float, procs, logs) -> list:
    """Poll `expr` until ok(result); fail with the children's logs if a child dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        res = prom.query(expr)
        if res is not None and ok(res):
            return res
        _check_alive(procs, logs)
        if time.monotonic() > deadline:
            pytest.fail(f"{expr} never satisfied the check within {timeout}s (last: {res})\n{_tails(logs)}\n"
                        f"--- prometheus\n{prom.log_tail(1500)}")
        time.sleep(0.5)


def test_dashboard_expressions_return_data_after_a_federated_run(mosquitto, tmp_path):
    prometheus = need_executable("prometheus", PROMETHEUS_HINT)
    t_start = time.monotonic()
    proxy = HoldFinalAnnouncement(mosquitto.port, Topics(FLEET).round)
    agg_port, agent_ports = free_port(), [free_port() for _ in range(AGENTS)]
    jobs = {"edgetune-aggregator": [agg_port], "edgetune-agent": agent_ports}
    logs = [tmp_path / "aggregator.log"] + [tmp_path / f"agent-{i}.log" for i in range(AGENTS)]
    procs: list[subprocess.Popen] = []
    with contextlib.closing(proxy), run_prometheus(prometheus, jobs, tmp_path / "prometheus") as prom:
        try:
            procs.append(spawn(
                "aggregator.cli",
                ["run", "--rounds", str(ROUNDS), "--min-agents", str(AGENTS), "--expected-agents", str(AGENTS),
                 "--max-local-steps", "3", "--eval-limit", "50", "--round-timeout", "300",
                 "--output-dir", str(tmp_path / "aggregator"), "--metrics-port", str(agg_port)],
                logs[0], EDGETUNE_BROKER_URL=f"mqtt://127.0.0.1:{proxy.port}", EDGETUNE_FLEET=FLEET,
                EDGETUNE_EVAL_DATA="demo:vader",
                EDGETUNE_METRICS_ADDR="127.0.0.1", EDGETUNE_METRICS_LINGER_S=0,
            ))
            for i in range(AGENTS):
                procs.append(spawn(
                    "edge_agent.cli", ["run"], logs[i + 1], EDGETUNE_BROKER_URL=mosquitto.url, EDGETUNE_FLEET=FLEET,
                    EDGETUNE_AGENT_ID=f"agent-{i}", EDGETUNE_METRICS_PORT=agent_ports[i],
                    EDGETUNE_METRICS_ADDR="127.0.0.1", EDGETUNE_METRICS_LINGER_S=0, EDGETUNE_DATA="demo:vader", EDGETUNE_DATA_LIMIT=100,
                    EDGETUNE_PARTITION="iid",
                    EDGETUNE_NUM_PARTITIONS=AGENTS, EDGETUNE_PARTITION_INDEX=i,
                ))
            prom.wait_ready()

            # during the run: both sides connected to the broker, as scraped
            _wait_for(prom, "edgetune_aggregator_broker_connected == 1", lambda r: len(r) == 1, 120, procs, logs)
            _wait_for(prom, "edgetune_agent_broker_connected == 1", lambda r: len(r) == AGENTS, 120, procs, logs)

            # the run's end: the aggregator's final announcement is held, all three still serve /metrics
            deadline = time.monotonic() + 150
            while not proxy.held.wait(0.5):
                _check_alive(procs, logs)
                if time.monotonic() > deadline:
                    pytest.fail(f"the run did not reach its end within 150s\n{_tails(logs)}")
            t_held = time.monotonic()
            # the aggregator waits 30 s for the broker's acknowledgement (then fails): finish well before
            hold_deadline = t_held + 20
            # a scrape after the last round was counted, and after the agents loaded the last global
            for expr, n in ((f"edgetune_aggregator_rounds_completed_total == {ROUNDS}", 1),
                            (f"edgetune_agent_rounds_participated_total == {ROUNDS}", AGENTS),
                            (f"edgetune_agent_global_adapter_version == {ROUNDS}", AGENTS)):
                _wait_for(prom, expr, lambda r, n=n: len(r) == n, max(1.0, hold_deadline - time.monotonic()),
                          procs, logs)

            agg, agents = {f"127.0.0.1:{agg_port}"}, {f"127.0.0.1:{p}" for p in agent_ports}

            def check(expr: str, targets: set[str], value: float) -> None:
                got = _values(prom.query(expr))
                assert got == dict.fromkeys(targets, value), f"{expr}: {got}"

            check("up", agg | agents, 1)
            check("edgetune_aggregator_broker_connected", agg, 1)
            check("edgetune_agent_broker_connected", agents, 1)
            check("edgetune_aggregator_rounds_completed_total", agg, ROUNDS)
            check('edgetune_aggregator_rounds_total{outcome="complete"}', agg, ROUNDS)  # rounds_completed's successor
            check('edgetune_aggregator_rounds_total{outcome="failed"}', agg, 0)
            # which release and fleet each process is, for the dashboards' variables
            check(f'edgetune_aggregator_build_info{{fleet="{FLEET}",mode="federated",protocol="2"}}', agg, 1)
            check(f'edgetune_agent_build_info{{fleet="{FLEET}",mode="federated",protocol="2"}}', agents, 1)
            assert {r["metric"]["agent"] for r in prom.query("edgetune_agent_build_info")} == {
                f"agent-{i}" for i in range(AGENTS)}, prom.query("edgetune_agent_build_info")
            check("edgetune_agent_rounds_participated_total", agents, ROUNDS)
            check("edgetune_aggregator_current_round", agg, ROUNDS)
            check("edgetune_aggregator_global_adapter_version", agg, ROUNDS)
            check("edgetune_agent_global_adapter_version", agents, ROUNDS)
            check("edgetune_aggregator_agents_connected", agg, AGENTS)
            (acc,) = _values(prom.query("edgetune_aggregator_global_accuracy_ratio")).values()
            assert 0.0 <= acc <= 1.0, acc
            (loss,) = _values(prom.query("edgetune_aggregator_global_loss")).values()
            assert math.isfinite(loss) and loss > 0, loss
            examples = _values(prom.query("edgetune_agent_local_examples"))
            assert len(examples) == AGENTS and all(0 < v <= 100 for v in examples.values()), examples

            # every dashboard expression, as Grafana would ask for it now
            without_data: dict[str, str] = {}
            exprs = _dashboard_exprs()
            assert len(exprs) >= 30
            for title, expr in exprs:
                res = prom.query(expr)
                if not res:
                    without_data[expr] = f"{title}: empty result"
                elif all(math.isnan(float(r["value"][1])) for r in res):
                    without_data[expr] = f"{title}: only NaN ({len(res)} series)"
            unexpected = {e: why for e, why in without_data.items() if e not in EXPECTED_WITHOUT_DATA}
            assert not unexpected, "dashboard expressions without data after a federated run:\n" + "\n".join(
                f"  {why}: {e}" for e, why in unexpected.items())
            now_with_data = set(EXPECTED_WITHOUT_DATA) - set(without_data)
            assert not now_with_data, f"expected without data, yet they have data (update the list): {now_with_data}"
            assert set(EXPECTED_WITHOUT_DATA) <= {e for _, e in exprs}, "EXPECTED_WITHOUT_DATA names a removed panel"
            t_released = time.monotonic()
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            proxy.release.set()
        finish_all(procs, timeout=60, logs=logs)  # released: the aggregator ends the run, the agents leave
    print(f"\nthe run reached its end after {t_held - t_start:.0f}s, held {t_released - t_held:.1f}s; "
          f"whole test {time.monotonic() - t_start:.0f}s")
