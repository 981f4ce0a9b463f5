"""The one-machine job: a broker, the aggregator and N agents as separate processes.

Used by `edgetune run` (the README's main command). It starts an embedded broker unless given
one, streams the aggregator's per-round metrics to the terminal, and plots accuracy per round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.transport import DEFAULT_MAX_PACKET_BYTES
from edgetune.local_broker import LocalBroker, start_local_broker


@dataclass
class RunOptions:
    agents: int = 4
    rounds: int = 5
    local_epochs: int = 1
    max_local_steps: int = 40
    partition: str = "by-domain"
    strategy: str = "fedavg"
    strategy_options: str = ""  # JSON, as EDGETUNE_STRATEGY_OPTIONS
    aggregation: str = "sync"
    async_buffer_size: int = 0
    prox_mu: float = 0.0
    broker_url: str | None = None
    output: Path = Path("runs/latest")
    eval_limit: int = 0
    round_timeout_s: float = 900
    threads_per_process: int = 1
    aggregator_threads: int = 2  # it idles while agents train; 1 where other jobs load the cores (2 threads then thrash)
    lr: float = 5e-3
    batch_size: int = 32
    num_layers: int | None = None  # the task's encoder layers kept (0: all; None: the aggregator's setting, 4)
    seed: int = 0
    fleet: str = "local"
    mode: str = "federated"
    split_encoding: str = "fp32"
    # the split demo: SmolLM2-135M (pretrained, ships offline) cut after 2 blocks, 4 x 64 tokens per step,
    # SPLIT_LOCAL_STEPS steps per round; gpt2-config (random init, the sizes below) is for throughput runs
    split_model: str = "smollm2"
    split_n_layer: int = 6
    split_n_embd: int = 256
    split_n_head: int = 4
    split_cut: int = 2
    seq_len: int = 64
    split_batch_size: int = 4
    split_lr: float = 0.0  # 0: split_lr_default(split_model)
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES  # the embedded broker's and every process's
    data: str = ""  # the agents' EDGETUNE_DATA, each taking its partition of it; "": the mode's demo (below)
    agent_data: list = field(default_factory=list)  # or agent i's own file, i-th in sorted order (--agent-data)
    eval_data: str = ""  # the aggregator's central evaluation data ("": the demo's when training on a demo, else none)
    labels: list = field(default_factory=list)  # the task's label names ([]: read from the data; the demo's)
    domain_column: str = ""  # partition "by:COLUMN": the column the by-domain partition splits by
    extra_env: dict = field(default_factory=dict)
    # the live progress between round lines (edgetune.progress_monitor): auto (tty on a terminal, else plain),
    # tty, plain or off; `edgetune run --progress` defaults to auto, a runner driven from Python to off
    progress: str = "off"


def _env(opts: RunOptions, broker_url: str, protocol: int) -> dict:
    env = dict(os.environ)
    env.update({
        "EDGETUNE_BROKER_URL": broker_url,
        "EDGETUNE_FLEET": opts.fleet,
        "EDGETUNE_MQTT_PROTOCOL": str(protocol),
        "EDGETUNE_MAX_PACKET_BYTES": str(opts.max_packet_bytes),
        "EDGETUNE_THREADS": str(opts.threads_per_process),
        "OMP_NUM_THREADS": str(opts.threads_per_process),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    })
    if opts.labels:  # the fleet's task: the aggregator publishes them, the agents map their data to them
        # (model settings go to the aggregator only: _agent_env leaves them out)
        env.update({"EDGETUNE_LABELS": json.dumps(list(opts.labels)), "EDGETUNE_NUM_LABELS": str(len(opts.labels))})
    if opts.domain_column:
        env["EDGETUNE_DOMAIN_COLUMN"] = opts.domain_column
    if opts.mode == "federated" and opts.num_layers is not None:
        env["EDGETUNE_NUM_LAYERS"] = str(opts.num_layers)
    if opts.mode == "split":
        env.update({
            "EDGETUNE_MODE": "split", "EDGETUNE_SPLIT_MODEL": opts.split_model,
            "EDGETUNE_SPLIT_N_LAYER": str(opts.split_n_layer), "EDGETUNE_SPLIT_N_EMBD": str(opts.split_n_embd),
            "EDGETUNE_SPLIT_N_HEAD": str(opts.split_n_head), "EDGETUNE_SPLIT_CUT": str(opts.split_cut),
            "EDGETUNE_SEQ_LEN": str(opts.seq_len),
            "EDGETUNE_SPLIT_LR": str(opts.split_lr or split_lr_default(opts.split_model)),
        })
    env.update(opts.extra_env)
    return env


SPLIT_LOCAL_STEPS = 10  # the split demo's steps per agent and round (federated: RunOptions.max_local_steps)


def split_lr_default(split_model: str) -> float:
    """LoRA on a randomly initialised GPT-2 needs a larger step than fine-tuning a pretrained model."""
    return 1e-2 if split_model == "gpt2-config" else 2e-3


def _progress(row: dict) -> str:
    if row.get("eval") == "federated":
        if "accuracy" not in row and "perplexity" not in row:
            return f"          global v{row['version']}: no agent reported its evaluation"
        score = (f"accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}" if "accuracy" in row
                 else f"perplexity {row['perplexity']:.1f}")
        n = row.get("eval_examples", row.get("eval_tokens"))
        return (f"round {row['round']:>2}, on the devices: {score}  loss {row['loss']:.4f}  global v{row['version']}  "
                f"({row['eval_agents']} agents, {n} held-out {'examples' if 'accuracy' in row else 'tokens'})")
    if row.get("outcome") == "failed":
        return f"round {row['round']}: FAILED ({len(row.get('answered', []))} answered, dropped {row.get('dropped')})"
    if "accuracy" in row:
        score = f"accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}  loss {row['loss']:.4f}"
    elif "perplexity" in row:
        score = f"perplexity {row['perplexity']:.1f}  loss {row['loss']:.4f}"
    else:
        score = "(no central evaluation)"
    line = f"round {row['round']:>2}: {score}  global v{row['version']}"
    if row.get("outcome") == "drain":
        line += f"  (async: {len(row['applied'])} updates that came after the last step)"
    elif row["round"]:
        line += f"  ({len(row['answered'])}/{len(row['selected'])} agents, {row['duration_s']:.0f}s)"
    else:
        line += "  (initial global)"
    return line


def plot_accuracy(metrics_file: Path, png: Path, title: str = "", agent_labels: dict | None = None) -> Path:
    """Left: the global held-out metric per round (accuracy, or perplexity with ROUGE-L in split
    mode). Right: each agent's local training loss per round (from the rows' "agents"), labelled
    with `agent_labels` (agent id -> what it trains on) where given. Rounds on integer ticks."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig = draw_run(rows, title, agent_labels or {})
    fig.savefig(png)
    plt.close(fig)
    return png


def draw_run(rows: list[dict], title: str = "", agent_labels: dict | None = None):
    """The figure plot_accuracy saves, from a run's metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    agent_labels = agent_labels or {}
    key = "accuracy" if any("accuracy" in r for r in rows) else "perplexity"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for source, style in (("central", "o-"), ("federated", "^--")):  # the aggregator's data, the devices' held-out rows
        scored = [r for r in rows if key in r and r.get("eval", "central") == source]
        if scored:
            ax.plot([r["round"] for r in scored], [r[key] for r in scored], style,
                    label=f"{key}, {'central' if source == 'central' else 'on the devices'}")
    ax.legend(loc="lower right" if key == "accuracy" else "upper right")
    ax.set_xlabel("round")
    ax.set_ylabel(f"global held-out {key}")
    if key == "accuracy":
        ax.set_ylim(0, 1)
    else:
        ax.set_yscale("log")
    rouge_rows = [r for r in rows if "rougeL" in r]
    if rouge_rows:
        axr = ax.twinx()
        axr.plot([r["round"] for r in rouge_rows], [r["rougeL"] for r in rouge_rows], marker="s", color="tab:green",
                 label="ROUGE-L")
        axr.set_ylabel("ROUGE-L of greedy continuations")
        axr.set_ylim(0, 1)
        axr.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"EdgeTune: global {key} per round")
    agents = sorted({a for r in rows for a in r.get("agents", {})})
    for a in agents:
        pts = [(r["round"], r["agents"][a]["train_loss"]) for r in rows
               if a in r.get("agents", {}) and r["agents"][a].get("train_loss") is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=f"{a} ({agent_labels[a]})" if a in agent_labels else a)
    ax2.set_xlabel("round")
    ax2.set_ylabel("local training loss")
    ax2.set_title("per agent")
    ax2.grid(alpha=0.3)
    if agents:
        ax2.legend(fontsize="small", ncol=1 if agent_labels else 2)
    for a in (ax, ax2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def agent_labels(opts: "RunOptions") -> dict[str, str]:
    """What each local agent trains on, for the plot's legend: its file, or its share of the data."""
    if opts.agent_data:
        return {f"agent-{i + 1}": Path(f).name for i, f in enumerate(opts.agent_data)}
    data = opts.data or demo_data(opts.mode)
    return {f"agent-{i + 1}": f"{opts.partition} part {i + 1}/{opts.agents} of {Path(data).name}"
            for i in range(opts.agents)}


def run_local(opts: RunOptions, echo=print) -> dict:
    """Run the job to its end (or Ctrl-C), echoing each round; returns the summary (rounds, seconds, plot)."""
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    agg_dir = out / "aggregator"
    metrics_file = agg_dir / "metrics.jsonl"
    _clear_previous_run(agg_dir, metrics_file)
    broker: LocalBroker | None = None
    procs: list[tuple[str, subprocess.Popen]] = []
    if opts.broker_url:
        url, protocol = opts.broker_url, int(opts.extra_env.get("EDGETUNE_MQTT_PROTOCOL", 5))
    else:
        broker = start_local_broker(out / "broker", opts.max_packet_bytes)
        url, protocol = broker.url, broker.mqtt_protocol
        echo(f"broker: {broker.kind} on {url}")
    env = _env(opts, url, protocol)
    stopping: list[int] = []  # Ctrl-C: the signal number, once asked

    old = signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    t0 = time.time()
    display = None
    try:
        display = _progress_display(opts, env, echo)
        echo = display.echo  # permanent lines go above the live view
        procs.append(("aggregator", _start(_aggregator_cmd(opts), _aggregator_env(opts, env, agg_dir),
                                           logs / "aggregator.log")))
        for i in range(opts.agents):
            aid = f"agent-{i + 1}"
            procs.append((aid, _start([sys.executable, "-m", "edge_agent.cli", "run"], _agent_env(opts, env, aid, i),
                                      logs / f"{aid}.log")))
        how = "a file each" if opts.agent_data else f"{opts.partition} partition"
        echo(f"started the aggregator and {opts.agents} agents ({how}); logs in {logs}")
        _follow(procs, metrics_file, opts.agents, logs, lambda: bool(stopping), echo, display)
        agg = procs[0][1]
        if agg.returncode not in (0, None) and not stopping:  # no final round will come: the agents would wait
            _stop_agents(procs[1:], echo, f"the aggregator exited with status {agg.returncode}")
        _wait_all(procs, echo)
        if agg.returncode not in (0, None) and not stopping:
            tail = (logs / "aggregator.log").read_text()[-3000:]
            raise RuntimeError(f"the aggregator failed (exit {agg.returncode}):\n{tail}")
    finally:
        signal.signal(signal.SIGINT, old)
        if display is not None:
            display.close()
        for _, p in procs:
            if p.poll() is None:
                p.kill()
        if broker is not None:
            broker.close()
    return _summary(opts, out, metrics_file, time.time() - t0)


def _clear_previous_run(agg_dir: Path, metrics_file: Path) -> None:
    """A new run in the same output folder starts without the last run's rounds and checkpoints, and
    its embedded broker without the last run's persistence: the retained final announcement and
    global it holds would otherwise tell the new agents that the run is already over."""
    import shutil

    if metrics_file.exists():
        metrics_file.unlink()
    shutil.rmtree(agg_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(agg_dir.parent / "broker", ignore_errors=True)


def _aggregator_cmd(opts: RunOptions) -> list[str]:
    cmd = [
        sys.executable, "-m", "aggregator.cli", "run", "--rounds", str(opts.rounds),
        "--min-agents", str(max(1, opts.agents // 2)), "--expected-agents", str(opts.agents),
        "--local-epochs", str(opts.local_epochs), "--max-local-steps", str(opts.max_local_steps),
        "--strategy", opts.strategy, "--round-timeout", str(opts.round_timeout_s),
    ]
    if opts.eval_limit:
        cmd += ["--eval-limit", str(opts.eval_limit)]
    return cmd


def central_eval_data(opts: RunOptions) -> str:
    """The aggregator's EDGETUNE_EVAL_DATA: --eval-data, else the demo's held-out split when the agents
    train on a demo (federated mode), else none (the agents' federated evaluation only)."""
    if opts.eval_data or opts.mode == "split":
        return opts.eval_data
    data = opts.data or demo_data(opts.mode)
    return data if data.startswith("demo:") and not opts.agent_data else ""


def _aggregator_env(opts: RunOptions, env: dict, agg_dir: Path) -> dict:
    # the aggregator idles while agents train: let its evaluation use two threads
    threads = str(opts.aggregator_threads)
    agg_env = dict(env, EDGETUNE_OUTPUT_DIR=str(agg_dir), EDGETUNE_THREADS=threads, OMP_NUM_THREADS=threads,
                   EDGETUNE_AGGREGATION=opts.aggregation, EDGETUNE_ASYNC_BUFFER_SIZE=str(opts.async_buffer_size))
    if opts.strategy_options:
        agg_env["EDGETUNE_STRATEGY_OPTIONS"] = opts.strategy_options
    if central_eval_data(opts):
        agg_env["EDGETUNE_EVAL_DATA"] = central_eval_data(opts)
    return agg_env


def demo_data(mode: str) -> str:
    """The shipped demo set the one-machine run trains on without --data: asked for by name."""
    return "demo:brown" if mode == "split" else "demo:vader"


def _agent_env(opts: RunOptions, env: dict, aid: str, i: int) -> dict:
    """Agent i's environment: its id, its data and partition of it, and its training seed. No model
    settings (the agents build their model from the task the aggregator publishes): where the
    aggregator's model is a local folder, the agents find it by name in its parent (EDGETUNE_MODEL_DIR)."""
    from edge_agent.local_settings import REMOVED_SETTINGS

    own = bool(opts.agent_data)  # agent i holds the i-th file, whole
    removed = {f"EDGETUNE_{name.upper()}" for name in REMOVED_SETTINGS}
    folders = [str(Path(env[k]).expanduser().resolve().parent) for k in ("EDGETUNE_MODEL", "EDGETUNE_SPLIT_MODEL")
               if env.get(k) and Path(env[k]).expanduser().is_dir()]
    env = {k: v for k, v in env.items() if k not in removed}
    if folders:
        env["EDGETUNE_MODEL_DIR"] = os.pathsep.join(folders + ([env["EDGETUNE_MODEL_DIR"]] if env.get("EDGETUNE_MODEL_DIR")
                                                               else []))
    return dict(env, EDGETUNE_AGENT_ID=aid,
                EDGETUNE_DATA=opts.agent_data[i] if own else (opts.data or demo_data(opts.mode)),
                EDGETUNE_PARTITION="iid" if own else opts.partition,
                EDGETUNE_SPLIT_ENCODING=opts.split_encoding,
                EDGETUNE_SPLIT_BATCH_SIZE=str(opts.split_batch_size),
                EDGETUNE_NUM_PARTITIONS="1" if own else str(opts.agents),
                EDGETUNE_PARTITION_INDEX="0" if own else str(i),
                EDGETUNE_PARTITION_SEED=str(opts.seed), EDGETUNE_LR=str(opts.lr),
                EDGETUNE_BATCH_SIZE=str(opts.batch_size), EDGETUNE_TRAIN_SEED=str(opts.seed + i),
                EDGETUNE_PROX_MU=str(opts.prox_mu))


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (Ctrl-C reaches it only through us), its output in `log`."""
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _progress_display(opts: RunOptions, env: dict, echo):
    """The live progress for opts.progress, its monitor on the run's broker with the processes' connection
    settings (edgetune.progress_monitor); a warning and the round lines only where it cannot have one."""
    from broker.settings import ConnectionSettings
    from edgetune.progress_monitor import ProgressDisplay, open_progress

    if opts.progress == "off":
        return ProgressDisplay("off", echo)
    try:
        conn = ConnectionSettings(
            broker_url=env["EDGETUNE_BROKER_URL"], fleet=env["EDGETUNE_FLEET"],
            mqtt_protocol=int(env["EDGETUNE_MQTT_PROTOCOL"]), max_packet_bytes=int(env["EDGETUNE_MAX_PACKET_BYTES"]),
            mqtt_username=env.get("EDGETUNE_MQTT_USERNAME"), mqtt_password=env.get("EDGETUNE_MQTT_PASSWORD"),
            ca_file=env.get("EDGETUNE_CA_FILE"))
    except ValueError as e:
        echo(f"warning: no live progress ({e}); the round lines follow")
        return ProgressDisplay("off", echo)
    return open_progress(opts.progress, conn, opts.rounds, echo)


def _follow(procs: list[tuple[str, subprocess.Popen]], metrics_file: Path, agents: int, logs: Path,
            stopping, echo, display=None) -> None:
    """Echo the aggregator's rounds as they come, and tick the live progress `display`, until the aggregator
    exits or Ctrl-C (then SIGINT to every process)."""
    seen = 0
    agg = procs[0][1]
    warned = False
    while True:
        if metrics_file.exists():
            rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            for row in rows[seen:]:
                echo(_progress(row))
                if display is not None:
                    display.row(row)
            seen = len(rows)
        if display is not None:
            display.tick()
        if agg.poll() is not None:
            break
        dead = [n for n, p in procs[1:] if p.poll() not in (None, 0)]
        if dead and not warned and len(dead) > agents - max(1, agents // 2):
            echo(f"agents {dead} exited with errors; see {logs}")
            warned = True
        if dead and all(p.poll() is not None for _, p in procs[1:]):  # no agent left: the run cannot go on
            agg.send_signal(signal.SIGINT)
            try:
                agg.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agg.kill()
            raise RuntimeError(f"every agent exited before the run ended ({', '.join(dead)} with errors): "
                               f"{_last_error(logs / f'{dead[0]}.log')} (logs in {logs})")
        if stopping():
            echo("stopping: the aggregator writes its checkpoint, agents go offline")
            for _, p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            break
        time.sleep(0.25 if display is not None and display.mode == "tty" else 0.5)


def _last_error(log: Path) -> str:
    """The last `error:` line of a process's log (or its last line)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return f"{log.name} is missing"
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [f"{log.name} is empty"])[-1]


AGENT_STOP_GRACE_S = 5.0  # agents get this long to go offline after a failed aggregator, then are killed


def _stop_agents(agents: list[tuple[str, subprocess.Popen]], echo, why: str,
                 grace_s: float = AGENT_STOP_GRACE_S) -> None:
    """SIGINT to every running agent (it goes offline and exits), then kill those still running after grace_s
    (an agent still loading its model exits only once it has loaded it)."""
    running = [(n, p) for n, p in agents if p.poll() is None]
    if not running:
        return
    echo(f"{why}: stopping the agents")
    for _, p in running:
        p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for _, p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_all(procs: list[tuple[str, subprocess.Popen]], echo, timeout_s: float = 60) -> None:
    """Wait for every process to exit, together at most `timeout_s`; kill those that do not."""
    deadline = time.monotonic() + timeout_s
    for name, p in procs:
        try:
            p.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            echo(f"{name} did not stop in time; killing it")
            p.kill()
            p.wait()


def _summary(opts: RunOptions, out: Path, metrics_file: Path, seconds: float) -> dict:
    """The run's rounds and time; with rounds, also the plot and summary.json."""
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()] if metrics_file.exists() else []
    summary = {"rounds": rows, "seconds": seconds, "output": str(out)}
    if rows:
        what = f"split {opts.split_encoding}" if opts.mode == "split" else opts.strategy
        if opts.aggregation == "async":
            what = f"async buffer {opts.async_buffer_size or max(1, opts.agents // 2)}"
        png = plot_accuracy(metrics_file, out / ("perplexity.png" if opts.mode == "split" else "accuracy.png"),
                            f"{opts.agents} agents, {opts.partition}, {what}", agent_labels=agent_labels(opts))
        summary["plot"] = str(png)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
