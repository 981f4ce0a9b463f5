"""The split agent's memory and start-up time: transformers + peft GPT-2 head vs the lean head.

Each measurement is a fresh Python process that does what a split agent does before and in its
first step: build the settings (edge_agent.settings.AgentSettings, mode split) and the spec from the
fleet's task (edge_agent.task_model.task_spec), construct
edge_agent.split_trainer.SplitTrainer (the head with LoRA and the tokenizer), tokenize local text
(data.corpus.token_blocks over the Brown sentences), run the head forward on one batch, and make
one split step (SplitTrainer.split_step; the server is a local stub that returns a gradient of
ones at once, so no broker and no tail: only the agent's own work is timed).

- transformers head: what the agent builds today: the full GPT2LMHeadModel from GPT2Config (random
  init, seeded), split_model (deep copies of the halves), peft LoRA on the head, GPT2TokenizerFast.
- lean head: models.lean_gpt2: torch modules + loralib, the head's tensors read from a safetensors
  folder written once by `python -m models.lean_gpt2 export` (done here before timing), the
  `tokenizers` BPE; the process never imports transformers or peft (checked in every run).
- floors, for scale: the same process stopped after its imports: torch and SplitTrainer's module
  alone, and with transformers, peft, GPT2LMHeadModel and GPT2TokenizerFast besides (no model built).

Times are from the parent's clock just before the process is spawned (interpreter start
included) to each milestone; peak RSS is the process's VmHWM at that milestone. Median of
--repeats runs per setup, round-robin, page cache warm (the export is written before the runs).

    python -m bench.agent_footprint                 # GPT-2 small (n_embd 768, cut 3) and the test config
    python -m bench.agent_footprint --repeats 1     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import report  # noqa: E402

CONFIGS = {
    # name: (n_layer, n_embd, n_head, cut, batch, seq_len)
    "gpt2-small": (12, 768, 12, 3, 8, 128),
    "test": (4, 256, 4, 2, 4, 32),  # tests/test_split_integration.py's fleet
}

FLOORS = {"floor": "imports only: torch", "floor-hf": "imports only: torch + transformers + peft"}

CHILD = r"""
import json, os, sys, time
T0 = float(os.environ["FOOTPRINT_T0"])
marks = {}

def mark(name):
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    marks[name] = {"s": time.time() - T0, "peak_rss_mb": hwm / 1024}

sys.path.insert(0, os.environ["FOOTPRINT_ROOT"])
import torch
torch.set_num_threads(int(os.environ["FOOTPRINT_THREADS"]))
from edge_agent.settings import AgentSettings
from edge_agent.split_trainer import SplitTrainer
head = os.environ["FOOTPRINT_HEAD"]
if head == "floor-hf":
    import peft
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
mark("imports")
if not head.startswith("floor"):
    from broker import activations
    from data.corpus import lm_split, token_blocks
    cfg = json.loads(os.environ["FOOTPRINT_CFG"])
    from broker.messages import TaskDefinition
    from edge_agent.task_model import task_spec
    from models.fingerprint import config_hash

    s = AgentSettings(agent_id="footprint", mode="split", split_head=head,
                      split_head_path=os.environ.get("FOOTPRINT_HEAD_PATH") or None)
    config = {"n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"], "n_head": cfg["n_head"]}
    task = TaskDefinition(mode="split", model="gpt2-config", model_hash=config_hash(config, 0), config=config,
                          max_length=cfg["seq_len"], lora_r=8, lora_alpha=16, cut=cfg["cut"])  # as the fleet's

    def request(step, encoding, tensors):
        act = activations.decode(tensors, encoding, "act")
        return type("R", (), {"loss": 0.0, "encoding": encoding})(), activations.encode(torch.ones_like(act), encoding, "grad")

    t = SplitTrainer(task_spec(task, []), request, batch_size=cfg["batch"], head=head, head_path=s.split_head_path)
    mark("head_ready")
    train, _ = lm_split()
    blocks = token_blocks(t.tokenizer, train[:2000], cfg["seq_len"], max_blocks=cfg["batch"])
    ids = blocks[: cfg["batch"]]
    mark("tokenized")
    with torch.no_grad():
        t.model(ids, torch.ones_like(ids))
    mark("first_forward")
    opt = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad], lr=1e-3)
    t.model.train()
    t.split_step(ids, opt)
    mark("first_step")
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "peft"})
print("FOOTPRINT " + json.dumps({"marks": marks, "heavy": heavy}))
"""


def run_child(head: str, cfg: dict, head_path: str | None, threads: int) -> dict:
    env = dict(os.environ, FOOTPRINT_ROOT=str(ROOT), FOOTPRINT_HEAD=head, FOOTPRINT_CFG=json.dumps(cfg),
               FOOTPRINT_HEAD_PATH=head_path or "", FOOTPRINT_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env["FOOTPRINT_T0"] = repr(time.time())
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=str(ROOT),
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{head} agent process failed:\n{out.stderr[-3000:]}")
    line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("FOOTPRINT "))
    return json.loads(line[len("FOOTPRINT "):])


def _measure(a, work: Path, rows: list[dict]) -> None:
    from models.lean_gpt2 import export_head
    from models.settings import DecoderSettings

    for name in a.configs.split(","):
        n_layer, n_embd, n_head, cut, batch, seq_len = CONFIGS[name]
        cfg = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, cut=cut, batch=batch, seq_len=seq_len)
        spec = DecoderSettings(split_n_layer=n_layer, split_n_embd=n_embd, split_n_head=n_head, split_cut=cut,
                               seq_len=seq_len).decoder_spec()
        t = time.perf_counter()
        head_dir = export_head(spec, work / name)
        export_s = time.perf_counter() - t
        head_mb = (head_dir / "model.safetensors").stat().st_size / 2**20
        runs: dict[str, list[dict]] = {"transformers": [], "lean": [], "floor": [], "floor-hf": []}
        for _ in range(a.repeats):  # round-robin, so that a busy moment on the machine hits every setup
            for head in runs:
                runs[head].append(run_child(head, cfg, str(head_dir) if head == "lean" else None, a.threads))
        by = {}
        for head, rs in runs.items():
            heavy = sorted({m for r in rs for m in r["heavy"]})
            marks = {k: {q: statistics.median(r["marks"][k][q] for r in rs) for q in ("s", "peak_rss_mb")}
                     for k in rs[0]["marks"]}
            row = {"config": name, "head": FLOORS.get(head, head), "imports_s": marks["imports"]["s"]}
            if head not in FLOORS:
                row.update(head_ready_s=marks["head_ready"]["s"], first_forward_s=marks["first_forward"]["s"],
                           first_step_s=marks["first_step"]["s"], rss_head_ready_mb=marks["head_ready"]["peak_rss_mb"],
                           peak_rss_mb=marks["first_step"]["peak_rss_mb"])
            else:
                row["peak_rss_mb"] = marks["imports"]["peak_rss_mb"]
            row["imports_transformers_or_peft"] = "yes" if heavy else "no"
            by[head] = row
            rows.append(row)
        base, lean = by["transformers"], by["lean"]
        if lean["imports_transformers_or_peft"] != "no":
            raise RuntimeError("the lean agent process imported transformers or peft")
        for row in (base, lean):
            row["startup_vs_transformers"] = row["first_forward_s"] / base["first_forward_s"]
            row["rss_vs_transformers"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        lean["note"] = f"head file {head_mb:.0f} MB (export {export_s:.1f} s, once)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    a = ap.parse_args(argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="edgetune-footprint-"))
    try:
        _measure(a, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report("agent_footprint", rows,
           columns=["config", "head", "imports_s", "head_ready_s", "first_forward_s", "first_step_s",
                    "rss_head_ready_mb", "peak_rss_mb", "startup_vs_transformers", "rss_vs_transformers",
                    "imports_transformers_or_peft", "note"],
           meta={"repeats": a.repeats, "threads": a.threads, "configs": {k: CONFIGS[k] for k in a.configs.split(",")},
                 "timing": "seconds from just before the process is spawned; median of repeats",
                 "rss": "VmHWM of the agent process at the milestone (peak so far), median of repeats"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
