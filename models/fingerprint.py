"""A base model's identity, the same on every machine: the `model_hash` of a fleet's task.

For a model folder (or one GGUF file): sha256 over the sorted (path relative to the folder,
sha256 of the file) of its config, weights and tokenizer files; nothing else in the folder
counts (READMEs, ONNX exports, other tools' files), and no machine-absolute path enters it.
For a model built from a config (random init): sha256 over the config's canonical JSON and the
seed. Pure: hashlib and the file system, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Mapping

# config, weights and tokenizer files (top level of the folder)
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "pytorch_model*.bin", "*.gguf",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.txt", "vocab.json", "merges.txt", "*.model")

_cache: dict[tuple[str, int, int], str] = {}


class ModelNotFound(FileNotFoundError):
    """The model files a task or a setting names are not on this machine (the message says where it looked)."""


def is_local(name_or_path: str) -> bool:
    """A model setting that names a local path (it exists here, or is written as one: ./, /, ~), not a
    hub name or a shipped model's name."""
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def model_files(path: str | Path) -> list[Path]:
    """The files that make a model's identity: a GGUF file itself, or a folder's matching files."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ModelNotFound(f"no model at {p}: looked for a folder with config.json and weights (or a .gguf file)")
    files = sorted(f for f in p.iterdir() if f.is_file() and any(fnmatch(f.name, pat) for pat in MODEL_FILES))
    if not any(f.name == "config.json" or f.suffix == ".gguf" for f in files):
        raise ModelNotFound(f"{p} holds no config.json (nor a .gguf file): not a model folder")
    return files


def model_hash(path: str | Path) -> str:
    """sha256 over the sorted (relative path, file sha256) of the model's config, weights and tokenizer files."""
    p = Path(path)
    root = p.parent if p.is_file() else p
    pairs = sorted((os.path.relpath(f, root).replace(os.sep, "/"), file_sha256(f)) for f in model_files(p))
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def config_hash(config: Mapping[str, Any], seed: int) -> str:
    """The identity of a model built from a config with a seed (random init)."""
    body = json.dumps({"config": dict(config), "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()
