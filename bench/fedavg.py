"""Streaming FedAvg of K adapter updates, as they come off the wire, against a plain copy.

    python -m bench.fedavg                      # K = 10, 100, 1000
    python -m bench.fedavg --k 10 100 --repeats 5

The updates are frames of the real wire format (`broker.codec.encode` of a `ModelUpdate`
header and the MiniLM-4L LoRA r=8 adapter state: 18 float32 tensors, 49,922 values). The
parent builds the model once for the tensor names and shapes, writes max(K) seeded random
frames to a temporary directory, and then runs each K in a fresh subprocess, which:

- reads every frame once (untimed) so that both passes read from the page cache, and
  aggregates one frame (untimed) so that lazy imports and first-call costs stay out;
- copy pass (the ceiling): for each frame, read its bytes and copy them into one
  preallocated bytearray;
- aggregate pass: for each frame, read its bytes, `codec.decode` them (length, sha256,
  safetensors), `parse` the header as a ModelUpdate, `WeightedMean.add(tensors,
  num_examples)`, drop them; `result()` at the end;
- repeats both passes (`--repeats`, median reported; every repeat is in the JSON).

No more than one frame is in memory at a time. Peak memory is the growth of the process's
resident set during the aggregate pass: the kernel's high-water mark (VmHWM) is reset just
before the pass (/proc/self/clear_refs) and compared with VmRSS at that moment, so it counts
everything (Python objects, torch tensors, safetensors buffers), not only Python-side
allocations. Where the reset is not allowed it falls back to ru_maxrss, which only shows growth
above the process's earlier peak (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- the adapter's shapes -----------------------------------------------------------------------


def adapter_shapes() -> dict[str, list[int]]:
    """Names and shapes of the MiniLM-4L LoRA r=8 adapter state, taken from the real model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from models.classifier import ClassifierSpec, adapter_state, build_classifier

    state = adapter_state(build_classifier(ClassifierSpec()))
    for k, t in state.items():
        if str(t.dtype) != "torch.float32":
            raise SystemExit(f"unexpected dtype {t.dtype} for {k}")
    return {k: list(t.shape) for k, t in state.items()}


# -- frames -------------------------------------------------------------------------------------


def frame_path(d: Path, i: int) -> Path:
    return d / f"update-{i:05d}.etf"


def make_frame(shapes: dict[str, list[int]], i: int, seed: int) -> bytes:
    import numpy as np
    import torch

    from broker import codec
    from broker.messages import ModelUpdate

    rng = np.random.default_rng([seed, i])
    tensors = {k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    msg = ModelUpdate(
        agent_id=f"agent-{i:05d}", round=1, base_version=0, num_examples=int(rng.integers(500, 5000)),
        nonce=f"{seed:08x}{i:024x}", train_loss=0.5, train_seconds=30.0,
    )
    return codec.encode(msg, tensors)


def write_frames(shapes: dict[str, list[int]], d: Path, k: int, seed: int) -> tuple[int, float]:
    """Write k frames; return (bytes of frame 0, seconds)."""
    t0 = time.perf_counter()
    size0 = 0
    for i in range(k):
        data = make_frame(shapes, i, seed)
        if i == 0:
            size0 = len(data)
        frame_path(d, i).write_bytes(data)
    return size0, time.perf_counter() - t0


# -- memory -------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Growth of the resident set over a block: reset VmHWM, compare the new peak with VmRSS."""

    def __init__(self) -> None:
        self.method = "VmHWM reset"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss"
        if _status_kb("VmHWM") is None:
            self.method = "ru_maxrss"

    def __enter__(self) -> "PeakRSS":
        if self.method == "VmHWM reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start_kb = _status_kb("VmRSS") or 0
        else:
            self.start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kb("VmHWM") if self.method == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.increase_mb = max(0, (peak or 0) - self.start_kb) / 1024


# -- one configuration (runs in a fresh subprocess) ----------------------------------------------


def run_one(d: Path, k: int, repeats: int) -> dict:
    import torch

    from aggregator.strategies import ClientUpdate, WeightedMean, fedavg
    from broker import codec
    from broker.messages import ModelUpdate, parse

    torch.set_num_threads(1)  # aggregation of an adapter this size is not worth a thread pool
    paths = [frame_path(d, i) for i in range(k)]
    sizes = [p.stat().st_size for p in paths]
    buf = bytearray(max(sizes))
    mv = memoryview(buf)
    for p in paths:  # warm the page cache for both passes
        p.read_bytes()

    def copy_pass() -> float:
        t0 = time.perf_counter()
        for p in paths:
            data = p.read_bytes()
            mv[: len(data)] = data
            del data
        return time.perf_counter() - t0

    def aggregate_pass() -> tuple[float, float, float, dict]:
        t_decode = t_add = 0.0
        t0 = time.perf_counter()
        acc = WeightedMean()
        for p in paths:
            data = p.read_bytes()
            a = time.perf_counter()
            frame = codec.decode(data, max_size=16 * 1024 * 1024)
            meta = parse(frame.header, ModelUpdate)
            b = time.perf_counter()
            acc.add(frame.tensors, float(meta.num_examples))
            t_add += time.perf_counter() - b
            t_decode += b - a
            del data, frame
        result = acc.result()
        return time.perf_counter() - t0, t_decode, t_add, result

    # one untimed update first: the lazy imports inside decode (safetensors.torch) and the first
    # use of torch/pydantic code paths would otherwise land in the first timed pass and its RSS
    warm = WeightedMean()
    f0 = codec.decode(paths[0].read_bytes())
    warm.add(f0.tensors, float(parse(f0.header, ModelUpdate).num_examples))
    warm.result()
    del warm, f0
    rss_before_mb = (_status_kb("VmRSS") or 0) / 1024

    mem = PeakRSS()
    reps = []
    result = None
    for _ in range(repeats):
        c = copy_pass()
        with mem:
            t, t_dec, t_add, result = aggregate_pass()
        reps.append({"copy_s": c, "aggregate_s": t, "decode_s": t_dec, "add_s": t_add, "peak_rss_increase_mb": mem.increase_mb})
        del result

    check = None
    if k <= 16:  # the streamed mean equals FedAvg over the materialised list
        ups = []
        acc = WeightedMean()
        for p in paths:
            f = codec.decode(p.read_bytes())
            n = parse(f.header, ModelUpdate).num_examples
            ups.append(ClientUpdate(f.header["agent_id"], f.tensors, n))
            acc.add(f.tensors, float(n))
        ref, got = fedavg(ups), acc.result()
        check = max(float((ref[n] - got[n]).abs().max()) for n in ref)

    med = {key: statistics.median(r[key] for r in reps) for key in reps[0]}
    return {
        "K": k,
        "frame_bytes": sizes[0],
        "total_mb": sum(sizes) / 1e6,
        "repeats": reps,
        "median": med,
        "peak_rss_increase_mb_max": max(r["peak_rss_increase_mb"] for r in reps),
        "rss_method": mem.method,
        "rss_before_mb": rss_before_mb,
        "rss_after_mb": (_status_kb("VmRSS") or 0) / 1024,
        "max_abs_diff_vs_fedavg": check,
    }


# -- driver -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100, 1000], help="numbers of updates to aggregate")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per K (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the frames (default: a temporary directory)")
    ap.add_argument("--child", nargs=2, metavar=("DIR", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), int(args.child[1]), args.repeats)))
        return

    from bench.common import report

    t_start = time.perf_counter()
    shapes = adapter_shapes()
    n_params = 0
    for s in shapes.values():
        n = 1
        for x in s:
            n *= x
        n_params += n
    print(f"adapter state: {len(shapes)} tensors, {n_params:,} float32 values")
    tmp = tempfile.TemporaryDirectory(prefix="edgetune-fedavg-", dir=args.dir)
    d = Path(tmp.name)
    try:
        size0, gen_s = write_frames(shapes, d, max(args.k), args.seed)
        print(f"wrote {max(args.k)} frames of {size0:,} bytes to {d} in {gen_s:.1f}s")
        rows, raw = [], []
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        for k in args.k:
            out = subprocess.run(
                [sys.executable, "-m", "bench.fedavg", "--child", str(d), str(k), "--repeats", str(args.repeats)],
                cwd=ROOT, env=env, capture_output=True, text=True,
            )
            if out.returncode:
                raise SystemExit(f"K={k} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            raw.append(r)
            m = r["median"]
            rows.append({
                "K": k,
                "frame bytes": r["frame_bytes"],
                "total MB": r["total_mb"],
                "aggregate s": m["aggregate_s"],
                "decode s": m["decode_s"],
                "add s": m["add_s"],
                "copy s": m["copy_s"],
                "ratio agg/copy": m["aggregate_s"] / m["copy_s"],
                "agg MB/s": r["total_mb"] / m["aggregate_s"],
                "copy MB/s": r["total_mb"] / m["copy_s"],
                "ms/update": 1e3 * m["aggregate_s"] / k,
                "peak RSS increase MB": r["peak_rss_increase_mb_max"],
            })
            print(f"K={k}: aggregate {m['aggregate_s']:.3f}s, copy {m['copy_s']:.3f}s, "
                  f"peak RSS +{r['peak_rss_increase_mb_max']:.1f} MB", flush=True)
    finally:
        tmp.cleanup()
    wall = time.perf_counter() - t_start
    report(
        "fedavg",
        rows,
        meta={
            "what": "streaming FedAvg (codec.decode + parse + WeightedMean.add per frame, one frame in memory) "
                    "vs. read + copy of the same bytes into a preallocated buffer; frames read from the page cache",
            "adapter": "MiniLM-4L (ClassifierSpec defaults) LoRA r=8 query/value + classifier head",
            "tensors": len(shapes),
            "params": n_params,
            "repeats": args.repeats,
            "statistic": "median of repeats; peak RSS: max over repeats",
            "rss_method": raw[0]["rss_method"] if raw else None,
            "threads": 1,
            "frame_generation_s": gen_s,
            "wall_s": wall,
            "raw": raw,
        },
    )
    checks = [r["max_abs_diff_vs_fedavg"] for r in raw if r["max_abs_diff_vs_fedavg"] is not None]
    print(f"\ntimes: median of {args.repeats}; peak RSS: growth of the resident set during the aggregate pass "
          f"({raw[0]['rss_method'] if raw else '?'}), max over repeats; copy = read + copy into a preallocated buffer")
    if checks:
        print(f"streamed mean vs fedavg() over the materialised list: max abs diff {max(checks):.3g}")
    print(f"wall time: {wall:.1f}s")


if __name__ == "__main__":
    main()
