"""Files as a frame's tensors: how an exported model folder crosses the wire (ModelArtifact).

`pack` reads files into uint8 tensors with their sha256; `unpack` writes them back into a new
folder, each checked against the sha256 in the (signed) message, or an ArtifactError.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from broker.errors import WireError


class ArtifactError(WireError):
    reason = "bad_model"


def pack(folder: str | Path, names: list[str]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(file name -> sha256 hex, file name -> uint8 tensor) of these files of `folder`."""
    tensors = {n: np.frombuffer((Path(folder) / n).read_bytes(), dtype=np.uint8) for n in names}
    return {n: hashlib.sha256(t.tobytes()).hexdigest() for n, t in tensors.items()}, tensors


def unpack(tensors: dict, files: dict[str, str], into: Path) -> Path:
    """Write the files into the new folder `into`, each checked against its sha256 in `files`."""
    if set(tensors) != set(files):
        raise ArtifactError(f"files {sorted(tensors)} differ from the signed list {sorted(files)}")
    into.mkdir(parents=True)
    for name, digest in files.items():
        data = np.asarray(tensors[name]).tobytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{name} does not match its signed sha256")
        (into / name).write_bytes(data)
    return into
