"""DESIGN.md rule 3: tensors travel as safetensors, never pickle.

Fails the build when `pickle.load`/`pickle.loads` (or an Unpickler), `torch.load(` or
`allow_pickle=True` appears in the project's Python sources outside tests/: every file git
knows of or would add (tracked, and untracked but not ignored), so a new file is caught before
it is committed. Comments and string literals are not code and are not flagged; aliases
(`import pickle as p; p.loads(...)`, `from torch import load`) are. Then the wire itself:
nothing in broker/ imports a pickle-family module, and broker/codec.py decodes with
safetensors alone, even when every unpickling entry point is booby-trapped.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import subprocess
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# text patterns, matched on code with comments and string literals blanked out
PATTERNS = {
    "pickle.load": re.compile(r"\b(?:c?[Pp]ickle|_pickle|dill|cloudpickle)\s*\.\s*(?:loads?|Unpickler)\b"),
    "torch.load(": re.compile(r"\btorch\s*\.\s*load\s*\("),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*True\b"),
}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNPICKLING_NAMES = {"load", "loads", "Unpickler"}
ADVICE = ("DESIGN.md rule 3: read tensors with safetensors (broker.codec, safetensors.torch.load_file) and "
          "messages with JSON/pydantic; never unpickle bytes that another process wrote")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}: {self.text.strip()}"


def project_sources(root: Path = ROOT) -> list[str]:
    """The project's .py files outside tests/ and .venv: tracked, or untracked and not ignored."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
                       cwd=root, capture_output=True, check=True)
    paths = sorted({p for p in r.stdout.decode().split("\0") if p})
    return [p for p in paths
            if not p.startswith(("tests/", ".venv/")) and "/.venv/" not in p and (root / p).is_file()]


def _code_only(source: str) -> list[str]:
    """The source's lines with comments and string literals replaced by spaces."""
    lines = source.splitlines(keepends=True)
    out = [list(line) for line in lines]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.COMMENT, tokenize.STRING):
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                row = out[r - 1]
                start = c0 if r == r0 else 0
                end = c1 if r == r1 else len(row)
                for c in range(start, min(end, len(row))):
                    if row[c] != "\n":
                        row[c] = " "
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return lines  # unparsable: check the raw text
    return ["".join(r) for r in out]


def _ast_findings(path: str, source: str) -> list[tuple[int, str]]:
    """Aliases the text patterns miss: `import pickle as p` / `from pickle import loads` / `from torch import load`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: list[tuple[int, str]] = []
    modules: dict[str, str] = {}  # local name -> pickle-family module or "torch"/"numpy"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in PICKLE_MODULES | {"torch", "numpy"}:
                    modules[a.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            for a in node.names:
                if top in PICKLE_MODULES and a.name in UNPICKLING_NAMES | {"*"}:
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
                elif node.module == "torch" and a.name == "load":
                    found.append((node.lineno, "from torch import load"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            mod = modules.get(node.value.id)
            if mod in PICKLE_MODULES and node.attr in UNPICKLING_NAMES and node.value.id != mod:
                found.append((node.lineno, f"{node.value.id}.{node.attr} ({mod}.{node.attr})"))
            elif mod == "torch" and node.attr == "load" and node.value.id != "torch":
                found.append((node.lineno, f"{node.value.id}.load (torch.load)"))
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append((node.lineno, "allow_pickle set to something other than False"))
    return found


def scan(root: Path, paths: list[str]) -> list[Finding]:
    findings: list[Finding] = []
    for rel in paths:
        source = (root / rel).read_text(errors="replace")
        raw = source.splitlines()
        for i, line in enumerate(_code_only(source), 1):
            for what, rx in PATTERNS.items():
                if rx.search(line):
                    findings.append(Finding(rel, i, what, raw[i - 1]))
        seen = {(f.path, f.line) for f in findings}
        for lineno, what in _ast_findings(rel, source):
            if (rel, lineno) not in seen:
                findings.append(Finding(rel, lineno, what, raw[lineno - 1] if lineno <= len(raw) else ""))
    return findings


# --- the project ----------------------------------------------------------------------------


def test_the_file_list_is_the_project():
    paths = project_sources()
    for must in ("broker/codec.py", "broker/transport.py", "aggregator/service.py", "edge_agent/light.py"):
        assert must in paths, f"{must} is missing from the scanned files: is git working here?"
    assert not [p for p in paths if p.startswith(("tests/", ".venv/"))]


def test_no_unpickling_in_the_project_sources():
    findings = scan(ROOT, project_sources())
    assert not findings, (
        f"{len(findings)} place(s) unpickle or may unpickle:\n" + "\n".join(f"  {f}" for f in findings) + f"\n{ADVICE}"
    )


def test_nothing_in_broker_imports_a_pickle_module():
    broker = [p for p in project_sources() if p.startswith("broker/")]
    assert "broker/codec.py" in broker
    bad = []
    for rel in broker:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES:
                    bad.append(f"{rel}:{node.lineno}: imports {name}")
    assert not bad, "the wire (broker/) must not import a pickle-family module:\n  " + "\n  ".join(bad)


def test_codec_reads_tensors_with_safetensors_only():
    """What broker/codec.py imports to turn bytes into tensors: safetensors' loaders and nothing else."""
    tree = ast.parse((ROOT / "broker" / "codec.py").read_text())
    loaders = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if a.name in ("load", "load_file", "loads", "deserialize"):
                    loaders.add(f"{node.module}.{a.name}")
    assert loaders == {"safetensors.numpy.load", "safetensors.torch.load"}, loaders
    # any other `<x>.load(s)`/`frombuffer` call would be a second way of reading bytes (JSON headers are fine)
    calls = {(ast.unparse(n.func.value), n.func.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("load", "loads", "frombuffer", "fromfile", "load_file")}
    assert calls <= {("json", "loads")}, calls


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point raises while the test runs."""
    import torch

    def trap(name):
        def f(*a, **k):
            raise AssertionError(f"{name} was called")
        return f

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(mod, attr, trap(f"{mod.__name__}.{attr}"))
    import _pickle

    monkeypatch.setattr(_pickle, "loads", trap("_pickle.loads"))
    monkeypatch.setattr(_pickle, "load", trap("_pickle.load"))


def test_codec_round_trip_never_unpickles(no_unpickling):
    import torch

    from broker import codec
    from broker.messages import ModelUpdate

    meta = ModelUpdate(agent_id="a-1", round=1, base_version=0, num_examples=3, nonce="n" * 16)
    tensors = {"lora_A": torch.randn(4, 8), "lora_B": torch.zeros(8, 4, dtype=torch.float16)}
    data = codec.encode(meta, tensors)
    got = codec.decode(data)
    assert torch.equal(got.tensors["lora_A"], tensors["lora_A"]) and got.tensors["lora_B"].dtype == torch.float16
    got_np = codec.decode(data, as_torch=False)
    assert np.array_equal(got_np.tensors["lora_A"], tensors["lora_A"].numpy())


def _frame_with_payload(payload: bytes) -> bytes:
    """A well-formed frame (right lengths, right checksum) around an arbitrary payload."""
    import hashlib
    import json

    from broker import codec

    header = json.dumps({"type": "model_update"}).encode()
    prefix = codec._PREFIX.pack(codec.MAGIC, codec.FRAME_VERSION, len(header), len(payload))
    return prefix + hashlib.sha256(prefix + header + payload).digest() + header + payload


@pytest.mark.parametrize("as_torch", [True, False])
def test_codec_refuses_a_pickled_payload(no_unpickling, as_torch, tmp_path):
    import torch

    from broker import codec
    from broker.errors import WireError

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    for obj in ({"w": np.ones(3, np.float32)}, Boom()):
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        with pytest.raises(WireError):
            codec.decode(_frame_with_payload(payload), as_torch=as_torch)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)  # a torch.save zip: pickle inside
    with pytest.raises(WireError):
        codec.decode(_frame_with_payload(buf.getvalue()), as_torch=as_torch)
    assert not (tmp_path / "pwned").exists()


# --- the scanner can fail -------------------------------------------------------------------


PLANTS = {
    "a.py": "import pickle\nx = pickle.loads(data)\n",
    "b.py": "import torch\nsd = torch.load(path)\n",
    "c.py": "import numpy as np\narr = np.load(f, allow_pickle=True)\n",
    "d.py": "import pickle as pk\nobj = pk.load(fh)\n",
    "e.py": "from torch import load\nsd = load(path)\n",
    "f.py": "from pickle import loads as l2\n",
    "g.py": "u = pickle.Unpickler(fh).load()\n",
    "h.py": "arr = np.load(f, allow_pickle = True)\n",
}
CLEAN = ('"""Never call pickle.loads( or torch.load( here."""\n'
         "# torch.load(path) would unpickle; allow_pickle=True too\n"
         "msg = 'do not use pickle.load'\n"
         "from safetensors.torch import load_file\n"
         "import numpy as np\n"
         "arr = np.load(f, allow_pickle=False)\n"
         "sd = load_file(path)\n")


def test_the_scanner_catches_planted_lines(tmp_path):
    for name, text in PLANTS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "clean.py").write_text(CLEAN)
    findings = scan(tmp_path, sorted(PLANTS) + ["clean.py"])
    flagged = {f.path for f in findings}
    assert flagged == set(PLANTS), "\n".join(map(str, findings))
    # the message points at the file and the line
    [b] = [f for f in findings if f.path == "b.py"]
    assert str(b).startswith("b.py:2: torch.load(: sd = torch.load(path)")
