"""Shared by every benchmark: machine description, a markdown table on stdout, JSON on disk."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("EDGETUNE_BENCH_DIR", Path(__file__).resolve().parent / "results"))


def simulation_args(p, *, local_steps: int, partition: str | list[str] = "iid") -> None:
    """The simulator options the strategy benches share: steps, lr, partition, model, data, seed."""
    p.add_argument("--local-steps", type=int, default=local_steps)
    p.add_argument("--lr", type=float, default=2e-3)
    if isinstance(partition, list):
        p.add_argument("--partition", nargs="+", default=partition)
    else:
        p.add_argument("--partition", default=partition)
    p.add_argument("--model", default="head", choices=["head", "full"])
    p.add_argument("--train-limit", type=int, default=0, help="a seeded sample of this many training examples (0: all)")
    p.add_argument("--eval-limit", type=int, default=0, help="and of this many held-out examples (0: all)")
    p.add_argument("--seed", type=int, default=0)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict], *, columns: list[str] | None = None, meta: dict | None = None) -> Path:
    """Print the table and the machine, write bench/results/<name>.json; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    m = machine()
    doc = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": m,
        "meta": meta or {},
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\n## {name}\n")
    print(table(rows, columns))
    print(f"\nmachine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores" + (f", {m['gpu']}" if "gpu" in m else ""))
    print(f"written: {out}")
    return out
