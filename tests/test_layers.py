"""The house's layers, checked on the source (no import is executed).

    common/                         logging, settings base, /metrics endpoint
    broker/                         the wire: topics, messages, codec, transport, broker config
    models/  data/                  model code, data
    edge_agent/  aggregator/        the two sides, side by side: never import each other
    edgetune/                       the tools on top (runner, simulator, CLIs): nothing below imports it

and: no import cycle between files, and the pure modules (the round engine, strategies, codec,
partitioners, the split step, the agent's protocol machine) import neither paho,
prometheus_client, transformers, peft nor model-loading code, directly or through what they
import at module level.

    python -m pytest tests/test_layers.py -q      # the command that shows all three
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "broker", "models", "data", "edge_agent", "aggregator", "edgetune")
BELOW = {
    "common": set(),
    "broker": {"common"},
    "models": {"common"},
    "data": {"common"},
    "edge_agent": {"common", "broker", "models", "data"},
    "aggregator": {"common", "broker", "models", "data"},
    "edgetune": {"common", "broker", "models", "data", "edge_agent", "aggregator"},
}
PURE = ("aggregator.rounds", "aggregator.coordinator", "aggregator.async_buffer", "aggregator.strategies",
        "aggregator.evaluation",
        "aggregator.split_server", "broker.codec", "broker.topics", "broker.messages", "data.partition",
        "edge_agent.protocol")
FORBIDDEN_THIRD_PARTY = {"paho", "prometheus_client", "transformers", "peft"}
MODEL_LOADING = {"models.classifier", "models.split", "models.lean_gpt2", "models.onnx_export"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


@lru_cache(maxsize=None)
def _imports(name: str, module_level_only: bool) -> frozenset[str]:
    """Names imported by module `name`: project modules resolved to files, others as their top-level name."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            targets = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            assert n.level == 0, f"{name}: use absolute imports"
            targets = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] not in PACKAGES:
                found.add(t.split(".")[0])
                continue
            parts = t.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ too
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES}
    found.discard(name)
    return frozenset(found)


def test_packages_import_only_the_layers_below():
    wrong = []
    for name in MODULES:
        pkg = name.split(".")[0]
        for target in _imports(name, module_level_only=False):
            tpkg = target.split(".")[0]
            if tpkg in PACKAGES and tpkg != pkg and tpkg not in BELOW[pkg]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_files():
    graph = {m: {t for t in _imports(m, module_level_only=False) if t in MODULES} for m in MODULES}
    # a package's __init__ re-exporting its own submodules is not a cycle
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("pure", PURE)
def test_pure_modules_import_no_io_and_no_model_loading(pure):
    assert pure in MODULES, f"{pure} is listed as pure but does not exist"
    seen, todo = set(), [pure]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(t for t in _imports(m, module_level_only=True) if t in MODULES)
    third = {t for m in seen for t in _imports(m, module_level_only=True) if t not in MODULES}
    assert not third & FORBIDDEN_THIRD_PARTY, f"{pure} imports {sorted(third & FORBIDDEN_THIRD_PARTY)}"
    assert not seen & MODEL_LOADING, f"{pure} imports model-loading code: {sorted(seen & MODEL_LOADING)}"
