"""The serve-only install, for real: the project's wheel, built from the sources, installed with the
`serve` extra (and constraints.txt) into a fresh venv that has no torch, answers `edgetune-agent
predict` from an exported ONNX model, stores feedback, and refuses `run` with what to install.

The packages come from wherever this machine's pip finds them (its configuration, its cache, PyPI);
EDGETUNE_WHEELHOUSE=DIR adds `--find-links DIR` (a folder of wheels, e.g. from `pip download`).
A package pip cannot get fails the test with pip's own words and what to do: it never skips.
About 45 s on 2 cores when pip's cache or a local index has the wheels (build 5 s, install
20 s, export 10 s; the times print with -s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, join_demo_task
from tests.onnx_support import SERVED_LABELS, export_served_model

HEAVY = ("torch", "transformers", "peft")
TEXTS = ["what a wonderful day", "this is terrible", "meh"]
INSTALL_HINT = ("the serve-install test needs pip to reach PyPI (or a local index in pip's configuration); offline, "
                "download the wheels once (pip download -d DIR -c constraints.txt 'onnxruntime' 'tokenizers' ...) "
                "and set EDGETUNE_WHEELHOUSE=DIR")


def _sources(dest: Path) -> Path:
    """What the wheel is built from (as .dockerignore allow-lists it), copied away from the checkout:
    the build's own build/ and *.egg-info land in the copy, and a file the wheel misses shows."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dest.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / f, dest / f)
    skip = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "*.onnx")
    for pkg in (p.rstrip("*") for p in include):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=skip)
    return dest


def _env() -> dict:
    """No PYTHONPATH (it would reach the checkout) and no venv of ours: only what the new venv holds."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "EDGETUNE_STATE_DIR": ""})
    return env


def _run(cmd: list, what: str, timeout: float, hint: str = "", **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=_env(), **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} took over {timeout}s: {' '.join(map(str, cmd))}\n{hint}\n{(e.stdout or '')[-2000:]}")
    if r.returncode != 0:
        pytest.fail(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-3000:]}\n{hint}")
    return r


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    pip = [sys.executable, "-m", "pip"]
    t0 = time.perf_counter()
    _run([*pip, "--version"], "pip", 60, "the test runs pip from the interpreter running pytest: python -m ensurepip")
    src = _sources(tmp / "src")
    _run([*pip, "wheel", "--no-deps", "--wheel-dir", tmp / "dist", src], "building the wheel", 300, INSTALL_HINT)
    (wheel,) = (tmp / "dist").glob("edgetune-*.whl")
    t1 = time.perf_counter()
    venv = tmp / "venv"
    # without pip: the test's own pip installs into it (--python), so the venv holds only the install
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "creating a venv", 120,
         "the venv module must work: apt-get install python3.11-venv")
    python = venv / "bin" / "python"
    find_links = os.environ.get("EDGETUNE_WHEELHOUSE")
    _run([*pip, "--python", python, "install", "--quiet", "-c", ROOT / "constraints.txt",
          *(["--find-links", find_links] if find_links else []), f"{wheel}[serve]"],
         "installing the wheel with the serve extra", 600, INSTALL_HINT)
    t2 = time.perf_counter()
    (site,) = (venv / "lib").glob("python3*/site-packages")
    print(f"\n[serve venv] wheel {t1 - t0:.1f}s, venv + install {t2 - t1:.1f}s, site-packages "
          f"{_size(site) / 2**20:.0f} MiB (no pip)")
    return SimpleNamespace(dir=venv, python=python, agent=venv / "bin" / "edgetune-agent", site=site, pip=pip,
                           wheel=wheel, cwd=tmp)


def test_serve_install_has_no_torch(serve_venv):
    """torch, transformers and peft are not importable; the project is the wheel's, not the checkout's;
    pip finds the installed set consistent."""
    code = ("import importlib.util, json, edge_agent, onnxruntime, tokenizers; "
            f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {HEAVY!r}}})); print(edge_agent.__file__)")
    r = _run([serve_venv.python, "-c", code], "importing in the serve venv", 120, cwd=serve_venv.cwd)
    found, where = r.stdout.splitlines()
    assert json.loads(found) == {m: False for m in HEAVY}
    assert Path(where).is_relative_to(serve_venv.site)
    r = subprocess.run([serve_venv.python, "-c", "import torch"], capture_output=True, text=True, env=_env(),
                       cwd=serve_venv.cwd)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    _run([*serve_venv.pip, "--python", serve_venv.python, "check"], "pip check in the serve venv", 120)


def test_serve_install_predicts(serve_venv, tmp_path):
    """`edgetune-agent predict` (the console script) answers from the state dir's model and from
    --model DIR, the same as OnnxPredictor here; --version works."""
    from edge_agent.inference import OnnxPredictor

    d = export_served_model(tmp_path / "state")
    want_ids, want_p = OnnxPredictor(d).predict(TEXTS)
    for where in (["--state-dir", tmp_path / "state"], ["--model", d]):
        r = _run([serve_venv.agent, "predict", *TEXTS, "--json", *where], "edgetune-agent predict", 120)
        got = [json.loads(x) for x in r.stdout.splitlines()]
        assert [x["text"] for x in got] == TEXTS
        assert [x["label_id"] for x in got] == want_ids
        assert [x["label"] for x in got] == [SERVED_LABELS[i] for i in want_ids]
        assert max(abs(a - b) for x, row in zip(got, want_p) for a, b in zip(x["probabilities"], row)) < 1e-5
    r = _run([serve_venv.agent, "--version"], "edgetune-agent --version", 60)
    assert r.stdout.startswith("edgetune 0.1.0 (")


def test_serve_install_feedback_and_run(serve_venv, tmp_path):
    """feedback stores a sample (SQLite, no torch); run, which trains, exits 2 saying what to install; serve
    (signed models only) starts without torch and refuses a missing keys file."""
    join_demo_task(tmp_path)
    r = _run([serve_venv.agent, "feedback", "a fine film", "--label", "positive", "--state-dir", tmp_path],
             "edgetune-agent feedback", 60)
    assert "stored sample 1 (positive)" in r.stdout
    r = subprocess.run([serve_venv.agent, "run", "--broker", "mqtt://127.0.0.1:9"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "needs torch" in r.stderr and "pip install 'edgetune[agent]'" in r.stderr
    # serve, the device that only serves, starts here (its imports need no torch) and checks its keys first
    r = subprocess.run([serve_venv.agent, "serve", "--state-dir", tmp_path, "--fleet-keys", tmp_path / "none.pem",
                        "--broker", "mqtt://127.0.0.1:9"], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 2 and "none.pem do not exist" in r.stderr and "Traceback" not in r.stderr, r.stderr
