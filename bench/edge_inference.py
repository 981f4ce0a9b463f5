"""Edge inference: torch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

The model is the edge classifier as served: all-MiniLM-L6-v2 pruned to 4 layers, LoRA (r=8 on
query/value, B randomised so the merge changes the weights) merged into the base, max_length 64.
Texts are real VADER snippets (the held-out split). Every timing is end to end, text in,
probabilities out (tokenization included: transformers' fast tokenizer for torch, the
`tokenizers` library for ONNX Runtime), with the same number of threads for both.

Measured: p50/p95 latency of one text (batch 1), texts/s at batch 32, peak RSS (VmHWM) of a
fresh process that loads the model and serves predictions on each path, file sizes of the fp32
and int8 ONNX models for 6, 4 and 2 layers, and ratios against torch eager from the same run.

    python -m bench.edge_inference [--latency-texts 200] [--batches 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import report, table  # noqa: E402


def vader_texts() -> list[str]:
    """The held-out VADER texts (data.sentiment's test split)."""
    from data.sentiment import train_test_split

    return [e.text for e in train_test_split()[1]]


def calibration_texts(n: int = 1024, seed: int = 0) -> list[str]:
    """Training-split texts for quantize_int8's accuracy guard (never the test split)."""
    from data.sentiment import train_test_split

    return [e.text for e in random.Random(seed).sample(train_test_split()[0], n)]


def build_model(num_layers: int, seed: int = 0, model: str | None = None):
    import torch

    from models.classifier import ClassifierSpec, build_classifier, load_tokenizer

    spec = ClassifierSpec(model=model, num_layers=num_layers, seed=seed)
    model = build_classifier(spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero LoRA, so that merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), load_tokenizer(spec)


def percentile_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def time_backends(fns: dict, single: list[str], batches: list[list[str]], block: int = 20, warmup: int = 5) -> dict:
    """Latency at batch 1 and throughput at batch 32 for each backend.

    The backends take turns in blocks (`block` texts, then 4 batches), in a rotating order, so a
    change in machine load during the run affects all of them alike. Both runtimes keep their
    worker threads spinning for a moment after a call, which slows whatever runs next: the first
    call of each block is run but not counted.
    """
    names = list(fns)
    for n in names:
        for t in single[:warmup]:
            fns[n]([t])
        fns[n](batches[0])
    lat = {n: [] for n in names}
    for i, start in enumerate(range(0, len(single), block)):
        chunk = single[start : start + block]
        for n in names[i % len(names):] + names[: i % len(names)]:
            fns[n]([chunk[-1]])  # not counted: the previous backend's threads may still spin
            for t in chunk:
                t0 = time.perf_counter()
                fns[n]([t])
                lat[n].append(time.perf_counter() - t0)
    busy = {n: 0.0 for n in names}
    count = {n: 0 for n in names}
    for i, start in enumerate(range(0, len(batches), 4)):
        group = batches[start : start + 4]
        for n in names[i % len(names):] + names[: i % len(names)]:
            fns[n]([group[0][0]])
            for b in group:
                t0 = time.perf_counter()
                fns[n](b)
                busy[n] += time.perf_counter() - t0
                count[n] += len(b)
    return {
        n: {"p50_ms_b1": percentile_ms(lat[n], 50), "p95_ms_b1": percentile_ms(lat[n], 95), "texts_per_s_b32": count[n] / busy[n]}
        for n in names
    }


SERVE_TORCH = """
import os, sys, json
sys.path.insert(0, {root!r})
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads({threads})
from transformers import AutoModelForSequenceClassification, AutoTokenizer
texts = json.load(open({texts!r}))
tok = AutoTokenizer.from_pretrained({model!r})
model = AutoModelForSequenceClassification.from_pretrained({model!r}).eval()
with torch.inference_mode():
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
        model(**enc).logits.softmax(-1)
    for t in texts[:32]:
        model(**tok([t], truncation=True, max_length=64, return_tensors="pt")).logits.softmax(-1)
"""

SERVE_ORT = """
import sys, json
sys.path.insert(0, {root!r})
from edge_agent.inference import OnnxPredictor
texts = json.load(open({texts!r}))
p = OnnxPredictor({model!r}, precision={precision!r}, threads={threads})
p.predict(texts)
for t in texts[:32]:
    p.predict([t])
assert "torch" not in sys.modules
"""

RSS_TAIL = """
for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
        print(line.split()[0].rstrip(":"), int(line.split()[1]))
"""


def peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + RSS_TAIL], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"serving subprocess failed:\n{out.stderr[-2000:]}")
    vals = dict(line.split() for line in out.stdout.splitlines() if line.startswith("Vm"))
    return int(vals["VmHWM"]) / 1024.0


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-texts", type=int, default=200, help="texts timed one at a time (batch 1)")
    ap.add_argument("--batches", type=int, default=16, help="batches of 32 timed for throughput")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="intra-op threads, both runtimes")
    ap.add_argument("--layers", type=int, default=4, help="encoder layers of the timed model")
    ap.add_argument("--size-layers", default="6,4,2", help="layer counts whose ONNX file sizes are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="base model folder (default: the shipped all-MiniLM-L6-v2)")
    args = ap.parse_args(argv)

    import torch

    from edge_agent.inference import OnnxPredictor
    from models.onnx_export import export_onnx, merged_copy
    from models.onnx_folder import read_meta
    from models.onnx_int8 import quantize_int8

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pool = vader_texts()
    rng = random.Random(args.seed)
    single = rng.sample(pool, args.latency_texts)
    batches = [rng.sample(pool, 32) for _ in range(args.batches)]

    calib = calibration_texts(seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    sizes = []
    timed_dir = None
    for layers in sorted({int(x) for x in args.size_layers.split(",")} | {args.layers}, reverse=True):
        peft_model, tok = build_model(layers, args.seed, args.model)
        d = work / f"onnx-{layers}l"
        fp32 = export_onnx(peft_model, tok, d, max_length=64, labels=["negative", "positive"])
        int8 = quantize_int8(fp32, calibration_texts=calib)
        if layers == args.layers:
            timed_dir, torch_model, tokenizer = d, merged_copy(peft_model), tok
        if str(layers) in args.size_layers.split(","):
            sizes.append({
                "layers": layers,
                "fp32_mb": fp32.stat().st_size / 1e6,
                "int8_mb": int8.stat().st_size / 1e6,
                "int8_vs_fp32": int8.stat().st_size / fp32.stat().st_size,
                "int8_blockwise_nodes": len(read_meta(d)["int8"]["nodes_blockwise"]),
                "int8_calibration_agreement": read_meta(d)["int8"]["calibration"]["agreement"],
            })
        del peft_model

    # -- latency and throughput, in this process ---------------------------------------------
    def torch_predict(texts):
        with torch.inference_mode():
            enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            return torch_model(**enc).logits.softmax(-1).numpy()

    ort = {p: OnnxPredictor(timed_dir, precision=p, threads=args.threads) for p in ("fp32", "int8")}
    flat = [t for b in batches for t in b]
    with torch.inference_mode():
        ref = np.concatenate([torch_model(**tokenizer(b, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits.numpy() for b in batches])
    backends = {
        ("torch eager", "fp32"): torch_predict,
        ("onnxruntime", "fp32"): lambda t: ort["fp32"].predict(t)[1],
        ("onnxruntime", "int8"): lambda t: ort["int8"].predict(t)[1],
    }
    load_before = os.getloadavg()
    timings = time_backends(backends, single, batches)
    load_after = os.getloadavg()
    rows = []
    for (name, precision), tm in timings.items():
        r = {"backend": name, "precision": precision, **tm}
        if name != "torch eager":
            logits = ort[precision].logits(flat)
            r["max_logit_diff"] = float(np.abs(logits - ref).max())
            r["argmax_agree"] = float(np.mean(logits.argmax(1) == ref.argmax(1)))
        else:
            r["max_logit_diff"], r["argmax_agree"] = 0.0, 1.0
        rows.append(r)

    # -- peak RSS of fresh serving processes ---------------------------------------------------
    hf_dir = work / "hf-merged"
    torch_model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(flat[:256]))
    common = {"root": str(ROOT), "texts": str(texts_file), "threads": args.threads}
    rss = {
        ("torch eager", "fp32"): peak_rss_mb(SERVE_TORCH.format(model=str(hf_dir), **common)),
        ("onnxruntime", "fp32"): peak_rss_mb(SERVE_ORT.format(model=str(timed_dir), precision="fp32", **common)),
        ("onnxruntime", "int8"): peak_rss_mb(SERVE_ORT.format(model=str(timed_dir), precision="int8", **common)),
    }
    files = {"fp32": (timed_dir / "model.onnx").stat().st_size / 1e6, "int8": (timed_dir / "model.int8.onnx").stat().st_size / 1e6}
    torch_file = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 1e6

    base = rows[0]
    for r in rows:
        key = (r["backend"], r["precision"])
        r["peak_rss_mb"] = rss[key]
        r["model_mb"] = torch_file if r["backend"] == "torch eager" else files[r["precision"]]
        r["p50_speedup"] = base["p50_ms_b1"] / r["p50_ms_b1"]
        r["b32_speedup"] = r["texts_per_s_b32"] / base["texts_per_s_b32"]
        r["rss_vs_torch"] = r["peak_rss_mb"] / base["peak_rss_mb"]

    print(f"\nload average (1 min) before / after the timing: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores")
    print("\n### ONNX model file sizes (MiniLM pruned to N layers, LoRA merged)\n")
    print(table(sizes))
    meta = {
        "model": f"all-MiniLM-L6-v2 pruned to {args.layers} layers, LoRA r=8 (query, value) merged, max_length 64",
        "texts": f"VADER held-out split: {len(single)} texts at batch 1, {len(batches)} batches of 32",
        "threads": args.threads,
        "timing": "end to end: tokenization + forward + softmax",
        "int8": "models.onnx_int8.quantize_int8 guarded by 1,024 training texts (target agreement 0.999): "
                "DynamicQuantizeMatMul / MatMulNBits(8 bit, block 32) per node, embeddings int8 per row, Gemm head fp32",
        "peak_rss": "VmHWM of a fresh python process that imports its runtime, loads the model and serves 256 texts in batches of 32 and 32 one at a time",
        "model_mb (torch row)": "merged model.safetensors, what the torch path loads",
        "sizes": sizes,
        "loadavg_1min_before_after_timing": [round(load_before[0], 2), round(load_after[0], 2)],
        "argmax_agree": "on the timed throughput texts, vs torch (this bench's model has a random LoRA and an untrained head)",
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    columns = ["backend", "precision", "p50_ms_b1", "p95_ms_b1", "texts_per_s_b32", "p50_speedup", "b32_speedup",
               "peak_rss_mb", "rss_vs_torch", "model_mb", "max_logit_diff", "argmax_agree"]
    return report("edge_inference", rows, columns=columns, meta=meta)


if __name__ == "__main__":
    main()
