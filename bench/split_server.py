"""Split server throughput on a GPU: 16 agents as micro-batches against one at a time.

GPT-2 small (random init: compute is that of the pretrained model), cut after block 3, LoRA
r=8 on c_attn, 128 tokens, 8 sequences per agent. Rows, all in one run on one device:

- bare batched:      plain PyTorch, the 16 agents' activations as one GPU-resident batch
- bare one at a time: the same, one agent after another
- split server:       SplitServer.serve() of the 16 requests as they arrive off the wire
                      (CPU tensors in, gradients back to CPU: host<->device copies included)
- split server, one at a time: serve() called once per request
- split server, device-resident: requests already on the GPU (the copies left out)

    python -m bench.split_server                     # on a CUDA machine
    python -m bench.split_server --device cpu --small   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from aggregator.split_server import SplitRequest, SplitServer
from bench.common import report
from models.split import DecoderSpec, add_lora, causal_lm_labels, load_full_model, lm_loss_per_sequence_group, split_model


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny GPT-2 for a smoke run")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 (TF32 matmuls) and/or bf16 autocast")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu --small for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = DecoderSpec(n_layer=4, n_embd=64, n_head=4, cut=2) if args.small else DecoderSpec(cut=3)
    full = load_full_model(spec)
    _, tail0 = split_model(full, spec.cut)
    del full
    tail0 = add_lora(tail0, ["c_attn"])
    A, B, T, C = args.agents, args.seqs, args.tokens, spec.n_embd
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(B, T, C, generator=g) for _ in range(A)]
    ids = [torch.randint(0, 50257, (B, T), generator=g) for _ in range(A)]
    mask = torch.ones(B, T, dtype=torch.long)
    labels = [causal_lm_labels(i, mask) for i in ids]
    tokens = A * B * T
    rows = []
    for dt_name in args.dtypes.split(","):
        ac = {"fp32": None, "bf16": torch.bfloat16}[dt_name]
        tail = copy.deepcopy(tail0).to(dev).train()
        params = [p for p in tail.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        acts_d = [a.to(dev) for a in acts]
        labels_d = [lb.to(dev) for lb in labels]
        mask_d = mask.to(dev)
        big_act = torch.cat(acts_d)
        big_labels = torch.cat(labels_d)
        big_mask = mask_d.repeat(A, 1)

        def bare(x, m, lb):
            x = x.detach().requires_grad_(True)
            with torch.autocast(dev.type, dtype=ac, enabled=ac is not None):
                logits = tail(x, m)
            (loss,) = lm_loss_per_sequence_group(logits, lb, [slice(0, x.shape[0])])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return x.grad

        t_bare = timeit(lambda: bare(big_act, big_mask, big_labels), dev, args.warmup, args.iters)
        t_bare1 = timeit(lambda: [bare(a, mask_d, lb) for a, lb in zip(acts_d, labels_d)], dev, args.warmup, args.iters)

        server = SplitServer(tail, lr=1e-4, device=dev, max_tokens=tokens, cache_per_agent=1, autocast_dtype=ac)
        step = [0]

        def reqs(on_device: bool):
            step[0] += 1  # fresh step ids: nothing answered from the cache
            return [SplitRequest(f"a{i}", step[0], acts_d[i] if on_device else acts[i], mask_d if on_device else mask,
                                 labels_d[i] if on_device else labels[i]) for i in range(A)]

        t_srv = timeit(lambda: server.serve(reqs(False)), dev, args.warmup, args.iters)
        t_srv1 = timeit(lambda: [server.serve([r]) for r in reqs(False)], dev, args.warmup, args.iters)
        t_srv_dev = timeit(lambda: server.serve(reqs(True)), dev, args.warmup, args.iters)
        for name, t in [("bare batched", t_bare), ("bare one at a time", t_bare1),
                        ("split server (micro-batch)", t_srv), ("split server, one at a time", t_srv1),
                        ("split server (micro-batch), device-resident", t_srv_dev)]:
            rows.append({"precision": dt_name, "path": name, "ms per 16-agent step": t * 1e3,
                         "tokens/s": tokens / t, "vs bare batched": t_bare / t})
        rows.append({"precision": dt_name, "path": "RATIO micro-batch / one at a time (server)",
                     "tokens/s": "", "vs bare batched": t_srv1 / t_srv})
        rows.append({"precision": dt_name, "path": "RATIO bare batched / bare one at a time",
                     "tokens/s": "", "vs bare batched": t_bare1 / t_bare})
        del tail, server, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report("split_server", rows, columns=["precision", "path", "ms per 16-agent step", "tokens/s", "vs bare batched"],
           meta={"model": "GPT-2 small (random init)" if not args.small else "tiny GPT-2", "cut": spec.cut,
                 "agents": A, "seqs_per_agent": B, "tokens": T, "device": str(dev), "iters": args.iters})


if __name__ == "__main__":
    main()
