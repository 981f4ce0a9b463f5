"""Split training tokens/s over a real loopback Mosquitto, against centralized LoRA training.

Everything runs on this machine in one run:

- a Mosquitto (edgetune.local_broker.start_mosquitto, the project's config) on a loopback port;
- the server: the aggregator's own split path, AggregatorService._pump -> _handle_split
  (frame decode, checks) -> _serve_split (batch window, SplitServer micro-batches, gradient
  frames published with the request's correlation), in a thread of this process; only the
  federated rounds around it are left out (a fixed set of selected agents stands in for a round);
- 1 or 3 agents, each a separate process (torch.set_num_threads(1)) running
  edge_agent.split_trainer.SplitTrainer.split_step with a request function that does what
  edge_agent.split_rpc.SplitClient.request does (SplitForward frame, MQTT 5 correlation and
  response topic, a Future for the SplitGradient);
- centralized: the unsplit model with LoRA on c_attn of every block (head + tail), the same
  batch, sequence length, optimizer and tokens, in this process.

Rows: split with fp32, fp16 and int8 encodings; and the old design: fp32 activations plus the
head's KV cache (`presents`: k and v of every head block, 2 x cut x B x T x C fp32 values, taken
from the real c_attn outputs) in every forward frame, served one request at a time (SplitServer
max_tokens = one request's tokens, so no micro-batch holds two agents).

The server waits up to its batch window (the aggregator's split_batch_window_ms, 20 ms by
default) for every selected agent's activation before it serves; on a busy CPU the agents'
requests arrive further apart than that, so the largest agent count is also run with a wider
window (--wide-window-ms). "server steps/agent step" shows what happened: 1 = every step one
micro-batch of all agents, n = one at a time.

tokens/s = agents x timed steps x B x T / wall time of the timed steps (after warm-up), measured
--repeats times round-robin over all setups (centralized included); the best repeat is the
headline (the least disturbed by anything else on the machine), the median is shown beside it;
wire bytes/token = bytes of the activation frames the agents published plus the gradient frames
the server published (whole frames: header, checksum, safetensors with mask and labels),
divided by the same tokens.

    python -m bench.split_throughput              # ~7 min on 2 CPU cores
    python -m bench.split_throughput --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FLEET = "bench"


def _spec(a):
    from models.split import DecoderSpec

    return DecoderSpec(n_layer=a["n_layer"], n_embd=a["n_embd"], n_head=a["n_head"], cut=a["cut"],
                       n_positions=max(1024, a["seq"]))


def _blocks(tokenizer, seq: int, n: int, offset: int):
    from data.corpus import lm_split, token_blocks

    train, _ = lm_split()
    return token_blocks(tokenizer, train[offset:], seq, max_blocks=n)


# -- agent process -----------------------------------------------------------------------------

def _agent_main(idx: int, url: str, a: dict, conn) -> None:
    import torch

    torch.set_num_threads(a["agent_threads"])
    from broker import codec
    from broker.messages import SplitForward, SplitGradient, parse
    from broker.topics import Topics
    from broker.transport import MqttTransport
    from edge_agent.split_trainer import SplitTrainer

    agent_id = f"agent-{idx}"
    topics = Topics(FLEET)
    t = MqttTransport(f"edgetune-bench-{agent_id}", url)
    t.subscribe(topics.split_gradient(agent_id))
    t.connect()
    counts = {"act": 0, "grad": 0, "frames_over_packet": 0}
    old_design = [False]
    kv: list[torch.Tensor] = []
    C = a["n_embd"]

    def request(step: int, encoding: str, tensors: dict):
        if old_design[0]:  # the old wire: the head's KV cache went along with every activation
            tensors = dict(tensors)
            tensors["presents"] = torch.stack(kv)  # (cut, B, T, 2C): k and v of each head block
        kv.clear()
        msg = SplitForward(agent_id=agent_id, step=step, encoding=encoding, head_version=0)
        payload = codec.encode(msg, tensors)
        corr = f"{agent_id}:{step}".encode()
        fut = t.expect_reply(corr)
        t.publish(topics.split_forward(agent_id), payload, correlation=corr,
                  response_topic=topics.split_gradient(agent_id))
        m = fut.result(timeout=300)
        counts["act"] += len(payload)
        counts["grad"] += len(m.payload)
        counts["frames_over_packet"] += (len(payload) > t.max_payload) + (len(m.payload) > t.max_payload)
        frame = codec.decode(m.payload)
        reply = parse(frame.header, SplitGradient)
        if reply.step != step or reply.agent_id != agent_id:
            raise RuntimeError(f"gradient for step {reply.step} of {reply.agent_id} answered step {step}")
        return reply, frame.tensors

    trainer = SplitTrainer(_spec(a), request, lr=1e-3, batch_size=a["batch"], seed=idx)
    for block in trainer.model.base_model.model.body.h:  # k and v = the last 2C of c_attn's output (LoRA included)
        block.attn.c_attn.register_forward_hook(
            lambda mod, inp, out: kv.append(out.detach()[..., C:]) if old_design[0] else None)
    blocks = _blocks(trainer.tokenizer, a["seq"], a["batch"] * 16, offset=idx * 3000)
    opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
    B = a["batch"]
    i = 0

    def step() -> float:
        nonlocal i
        ids = blocks[(i * B) % (len(blocks) - B + 1):][:B]
        i += 1
        return trainer.split_step(ids, opt)

    conn.send("loaded")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        trainer.encoding, old_design[0] = cmd["encoding"], cmd["old_design"]
        for _ in range(cmd["warmup"]):
            step()
        conn.send("ready")
        conn.recv()  # go
        for k in counts:
            counts[k] = 0
        t0 = time.monotonic()
        losses = [step() for _ in range(cmd["steps"])]
        t1 = time.monotonic()
        conn.send({"t0": t0, "t1": t1, **counts, "loss": sum(losses) / len(losses)})
    t.close()


# -- server (this process) ---------------------------------------------------------------------

class Server:
    """AggregatorService's split path in a thread: _pump -> _handle_split -> _serve_split."""

    def __init__(self, url: str, a: dict, workdir: Path) -> None:
        from aggregator.service import AggregatorService
        from aggregator.settings import AggregatorSettings
        from models.split import add_split_lora, load_full_model, lora_targets, split_model

        spec = _spec(a)
        full = load_full_model(spec)
        _, tail = split_model(full, spec.cut)
        self.tail = add_split_lora(tail, lora_targets(full), spec, "tail")
        self.B, self.T = a["batch"], a["seq"]
        s = AggregatorSettings(mode="split", broker_url=url, fleet=FLEET, output_dir=workdir / "aggregator",
                               device="cpu", split_lr=1e-3, split_n_layer=spec.n_layer, split_n_embd=spec.n_embd,
                               split_n_head=spec.n_head, split_cut=spec.cut, seq_len=self.T)
        self.svc = AggregatorService(s)
        self.svc.task = SimpleNamespace(head=SimpleNamespace(config=full.config), server=None)
        self.svc.split_queue = []
        self.svc._connect()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="split-server", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from aggregator.service import Stop

        try:
            while True:
                self.svc._pump(time.monotonic() + 0.5)
        except Stop:
            pass
        except BaseException as e:  # reported by the main thread
            self.error = e

    def configure(self, agents: list[str], one_at_a_time: bool, window_ms: float) -> None:
        from aggregator.split_server import SplitServer

        self.svc.s.split_batch_window_ms = window_ms
        # the round's selected agents: _serve_split waits (up to its window) for all of them
        self.svc.round = SimpleNamespace(selected=list(agents), accepted={})
        max_tokens = self.B * self.T if one_at_a_time else self.svc.s.split_max_tokens
        self.svc.task.server = SplitServer(self.tail, lr=1e-3, device="cpu", max_tokens=max_tokens)

    @property
    def steps(self) -> int:
        return self.svc.task.server.server_step

    def close(self) -> None:
        self.svc._stop = True
        self.thread.join(10)
        self.svc.transport.close()


# -- centralized -------------------------------------------------------------------------------

class Centralized:
    """The unsplit model with LoRA on every block's c_attn (head + tail), trained in this process."""

    def __init__(self, a: dict) -> None:
        import torch

        from models.split import add_split_lora, load_full_model, load_tokenizer, lora_targets

        spec = _spec(a)
        full = load_full_model(spec)
        # seeded as the head: peft draws the blocks' LoRA in order, so blocks 0..cut-1 start as the agents' head
        self.model = add_split_lora(full, lora_targets(full), spec, "head").train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.B, self.T = a["batch"], a["seq"]
        self.blocks = _blocks(load_tokenizer(spec), self.T, self.B * 16, offset=0)
        self.i = 0

    def step(self) -> float:
        import torch

        from models.split import causal_lm_labels, lm_loss_per_sequence_group

        B = self.B
        ids = self.blocks[(self.i * B) % (len(self.blocks) - B + 1):][:B]
        self.i += 1
        mask = torch.ones_like(ids)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (loss,) = lm_loss_per_sequence_group(logits, causal_lm_labels(ids, mask), [slice(0, B)])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss)

    def measure(self, threads: int, warmup: int, steps: int) -> dict:
        import torch

        torch.set_num_threads(threads)
        for _ in range(warmup):
            self.step()
        t0 = time.monotonic()
        losses = [self.step() for _ in range(steps)]
        dt = time.monotonic() - t0
        return {"tokens_per_s": steps * self.B * self.T / dt, "loss": sum(losses) / len(losses)}


# -- main --------------------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--agents", default="1,3", help="agent counts to run")
    ap.add_argument("--encodings", default="fp32,fp16,int8")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per agent in each repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each repeat")
    ap.add_argument("--repeats", type=int, default=3,
                    help="every setup is measured this many times, round-robin over the setups; the median is shown")
    ap.add_argument("--server-threads", type=int, default=2, help="torch threads of the server (and centralized)")
    ap.add_argument("--agent-threads", type=int, default=1, help="torch threads of each agent process")
    ap.add_argument("--window-ms", type=float, default=None,
                    help="the server's batch window (default: the aggregator's, EDGETUNE_SPLIT_BATCH_WINDOW_MS)")
    ap.add_argument("--wide-window-ms", type=float, default=200,
                    help="also run the largest agent count with this window (0: not)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.n_layer, args.n_embd, args.n_head, args.cut, args.seq, args.batch = 2, 64, 2, 1, 16, 2
        args.steps, args.warmup, args.repeats = 2, 1, 2
    a = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "cut": args.cut, "seq": args.seq,
         "batch": args.batch, "agent_threads": args.agent_threads}
    agent_counts = [int(x) for x in args.agents.split(",")]
    encodings = args.encodings.split(",")
    wall0 = time.monotonic()
    load0 = os.getloadavg()

    from bench.common import report
    from edgetune.local_broker import start_mosquitto

    B, T, C, cut = args.batch, args.seq, args.n_embd, args.cut
    cen = Centralized(a)
    cen_threads = sorted({args.server_threads, 1}, reverse=True)
    results: dict[tuple, list[dict]] = {}

    workdir = Path(tempfile.mkdtemp(prefix="edgetune-bench-split-"))
    broker = start_mosquitto(workdir=workdir / "mosquitto")
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    server = None

    def wait(c):
        while not c.poll(1.0):
            if server.error:
                raise RuntimeError(f"split server failed: {server.error!r}")
        return c.recv()

    try:
        for i in range(max(agent_counts)):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_agent_main, args=(i, broker.url, a, child), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        server = Server(broker.url, a, workdir)
        for c in conns:
            if not c.poll(300):
                raise RuntimeError("an agent process did not load within 300 s")
            c.recv()
        window = server.svc.s.split_batch_window_ms if args.window_ms is None else args.window_ms
        runs = [(n, enc, False, window) for n in agent_counts for enc in encodings]
        if args.wide_window_ms and max(agent_counts) > 1:
            runs += [(max(agent_counts), enc, False, args.wide_window_ms) for enc in encodings]
        runs += [(n, "fp32", True, window) for n in agent_counts]

        for rep in range(args.repeats):
            # centralized: the agent processes are idle (blocked on their pipe), the server thread too
            for th in cen_threads:
                results.setdefault(("cen", th), []).append(cen.measure(th, args.warmup, args.steps))
            import torch

            torch.set_num_threads(args.server_threads)
            for n, enc, old, win in runs:
                server.configure([f"agent-{i}" for i in range(n)], one_at_a_time=old, window_ms=win)
                cmd = {"encoding": enc, "old_design": old, "warmup": args.warmup, "steps": args.steps}
                for c in conns[:n]:
                    c.send(cmd)
                for c in conns[:n]:
                    assert wait(c) == "ready"
                s0 = server.steps
                for c in conns[:n]:
                    c.send("go")
                res = [wait(c) for c in conns[:n]]
                tokens = n * args.steps * B * T
                results.setdefault((n, enc, old, win), []).append({
                    "tokens_per_s": tokens / (max(r["t1"] for r in res) - min(r["t0"] for r in res)),
                    "act": sum(r["act"] for r in res) / tokens, "grad": sum(r["grad"] for r in res) / tokens,
                    "server_steps": (server.steps - s0) / args.steps,
                    "chunked": sum(r["frames_over_packet"] for r in res),
                    "loss": sum(r["loss"] for r in res) / n})
                print(f"  repeat {rep + 1}: {n} agent(s), {enc}{' + presents, one at a time' if old else ''}, "
                      f"window {win:g} ms: {results[(n, enc, old, win)][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        for c in conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
        if server is not None:
            server.close()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)

    ref = max(r["tokens_per_s"] for r in results[("cen", args.server_threads)])
    rows: list[dict] = []
    for key, rs in results.items():
        tps = [r["tokens_per_s"] for r in rs]
        row = {"tokens/s": max(tps), "median": _median(tps), "worst": min(tps), "vs centralized": max(tps) / ref,
               "loss": sum(r["loss"] for r in rs) / len(rs)}
        if key[0] == "cen":
            th = key[1]
            row.update({"setup": f"centralized LoRA ({th} torch thread{'s' if th > 1 else ''})", "agents": "-",
                        "encoding": "-", "wire B/token": 0, "server steps/agent step": "-"})
        else:
            n, enc, old, win = key
            row.update({"setup": (f"old design: fp32 + KV cache, one request at a time, window {win:g} ms" if old
                                  else f"split, micro-batched, window {win:g} ms"),
                        "agents": n, "encoding": enc + (" + presents" if old else ""),
                        "wire B/token": sum(r["act"] + r["grad"] for r in rs) / len(rs),
                        "act frame B/token": sum(r["act"] for r in rs) / len(rs),
                        "grad frame B/token": sum(r["grad"] for r in rs) / len(rs),
                        "server steps/agent step": sum(r["server_steps"] for r in rs) / len(rs),
                        "chunked frames": sum(r["chunked"] for r in rs)})
        rows.append(row)
    wall = time.monotonic() - wall0
    report("split_throughput", rows,
           columns=["setup", "agents", "encoding", "tokens/s", "median", "vs centralized", "wire B/token",
                    "act frame B/token", "grad frame B/token", "server steps/agent step", "loss"],
           meta={"model": f"reduced GPT-2 (random init): n_layer {args.n_layer}, n_embd {C}, n_head {args.n_head}, "
                          f"vocab 50257; GPT-2 small is too slow on 2 CPU cores",
                 "cut": cut, "seq_len": T, "batch_per_agent": B, "lora": "r=8 on c_attn",
                 "timed_steps_per_agent": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
                 "tokens/s": "best of the repeats (also the median and worst); tokens = sequences x seq_len; "
                             "vs centralized: best over best",
                 "agents_as": f"separate processes, torch.set_num_threads({args.agent_threads}) each",
                 "server": f"AggregatorService split path in a thread of the bench process, "
                           f"torch.set_num_threads({args.server_threads}); SplitServer on CPU",
                 "centralized_reference": f"{args.server_threads} torch threads",
                 "batch_window_ms": window,
                 "broker": "mosquitto on loopback (project mosquitto.conf)",
                 "old_design_presents_values_per_step": 2 * cut * B * T * C,
                 "activation_values_per_step": B * T * C,
                 "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
                 "wall_seconds": round(wall, 1)})
    print(f"wall time: {wall:.0f}s")


if __name__ == "__main__":
    main()
