"""How long `edgetune run` takes to refuse a user's mistake, against `edgetune --version`.

    python -m bench.cli_errors [--repeats 5]

Each case is a fresh `python -m edgetune.cli ...` process, timed from start to exit (the median
of --repeats). The baseline, in the same run, is `edgetune --version`: the cost of starting
Python and importing the CLI, which every command pays; the ratio says what a check adds. The
cases are the ones tests/test_cli_errors.py checks (exit code and message); the strategy case
builds the strategy, which imports torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import report  # noqa: E402


def _free_port() -> int:
    from edgetune.local_broker import free_port

    return free_port()


def cases(tmp: Path) -> list[tuple[str, list[str], dict, int]]:
    """(name, arguments, extra environment, expected exit code)."""
    (tmp / "empty").mkdir(exist_ok=True)
    return [
        ("--version (baseline)", ["--version"], {}, 0),
        ("--strategy-options not JSON", ["run", "--strategy-options", "{bad"], {}, 2),
        ("--mode not a choice", ["run", "--mode", "splitt"], {}, 2),
        ("model folder missing", ["run", "--mode", "split", "--split-model", str(tmp / "gone")], {}, 2),
        ("EDGETUNE_MODEL not a model", ["run"], {"EDGETUNE_MODEL": str(tmp / "empty")}, 2),
        ("--broker unreachable", ["run", "--broker", f"mqtt://127.0.0.1:{_free_port()}"], {}, 3),
        ("strategy refuses its options (imports torch)", ["run", "--strategy", "krum", "--strategy-options",
                                                         '{"f": -1}'], {}, 2),
    ]


def time_case(args: list[str], env: dict, code: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "edgetune.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, **env})
        times.append(time.perf_counter() - t0)
        if p.returncode != code:
            raise RuntimeError(f"edgetune {' '.join(args)}: exit {p.returncode}, expected {code}:\n{p.stderr[-2000:]}")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        measured = [(name, time_case(args, env, code, a.repeats), code) for name, args, env, code in cases(Path(tmp))]
    base = measured[0][1]
    rows = [{"case": name, "exit": code, "seconds": round(s, 3), "x baseline": round(s / base, 2)}
            for name, s, code in measured]
    report("cli_errors", rows, meta={"repeats": a.repeats})


if __name__ == "__main__":
    main()
