"""The frame codec: a fixed binary header, a JSON message header and a safetensors payload.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"ETF\\x00"
    4       2     frame format version (FRAME_VERSION)
    6       4     H = length of the JSON header
    10      8     P = length of the safetensors payload
    18      32    sha256 over bytes [0, 18) + header + payload
    50      H     JSON header (a pydantic message, see broker.messages)
    50+H    P     safetensors payload (may be empty: P = 0)

Nothing here unpickles: tensors are read with safetensors only. The decoder checks every
length against the bytes it was given and against `max_size` before it allocates anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load_np
from safetensors.numpy import save as st_save_np

from broker.errors import (
    BadMagic,
    ChecksumMismatch,
    MalformedFrame,
    OversizedFrame,
    TruncatedFrame,
    UnsupportedVersion,
)

MAGIC = b"ETF\x00"
FRAME_VERSION = 1
_PREFIX = struct.Struct(">4sHIQ")  # magic, version, header length, payload length
PREFIX_SIZE = _PREFIX.size  # 18
DIGEST_SIZE = 32
FIXED_SIZE = PREFIX_SIZE + DIGEST_SIZE  # 50
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

# dtypes a frame may carry, by safetensors name
SUPPORTED_DTYPES = ("F32", "F16", "BF16", "I8", "I64", "I32", "U8", "BOOL")


@dataclass
class Frame:
    """A decoded frame: the JSON header as a dict and the tensors by name."""

    header: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)  # torch.Tensor or np.ndarray


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch")


def _tensors_to_bytes(tensors: dict[str, Any]) -> bytes:
    if not tensors:
        return b""
    if any(_is_torch(t) for t in tensors.values()):
        from safetensors.torch import save as st_save_torch

        return st_save_torch({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return st_save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def encode(header: dict[str, Any] | Any, tensors: dict[str, Any] | None = None) -> bytes:
    """Encode a header (dict or pydantic model) and named tensors into one frame."""
    if hasattr(header, "model_dump"):
        header = header.model_dump(mode="json")
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    payload = _tensors_to_bytes(tensors or {})
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, len(hbytes), len(payload))
    digest = hashlib.sha256()
    digest.update(prefix)
    digest.update(hbytes)
    digest.update(payload)
    return b"".join((prefix, digest.digest(), hbytes, payload))


def _check_payload_header(payload: bytes) -> None:
    """Validate the safetensors JSON header ourselves so that every failure is typed."""
    if len(payload) < 8:
        raise TruncatedFrame("safetensors payload shorter than its 8-byte length prefix")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > len(payload) - 8:
        raise TruncatedFrame("safetensors header runs past the payload")
    try:
        meta = json.loads(payload[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedFrame(f"safetensors header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise MalformedFrame("safetensors header is not an object")
    body = len(payload) - 8 - n
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SUPPORTED_DTYPES:
            raise MalformedFrame(f"tensor {name!r}: unsupported or missing dtype")
        offs = info.get("data_offsets")
        shape = info.get("shape")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and 0 <= o <= body for o in offs)
            or offs[0] > offs[1]
            or not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise MalformedFrame(f"tensor {name!r}: bad shape or offsets")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_FRAME,
    as_torch: bool = True,
) -> Frame:
    """Decode and verify one frame. Raises a `FrameError` subclass for anything malformed."""
    data = bytes(data)
    if len(data) > max_size:
        raise OversizedFrame(f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    if len(data) < FIXED_SIZE:
        raise TruncatedFrame(f"frame of {len(data)} bytes is shorter than the {FIXED_SIZE}-byte header")
    magic, version, hlen, plen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagic("not an EdgeTune frame (bad magic)")
    if version != FRAME_VERSION:
        raise UnsupportedVersion(
            f"frame format version {version}; this build reads version {FRAME_VERSION}: "
            "upgrade the older side"
        )
    total = FIXED_SIZE + hlen + plen
    if total > max_size:
        raise OversizedFrame(f"frame declares {total} bytes, over the limit of {max_size}")
    if len(data) < total:
        raise TruncatedFrame(f"frame declares {total} bytes but {len(data)} arrived")
    if len(data) > total:
        raise MalformedFrame(f"{len(data) - total} trailing bytes after the frame")
    digest = hashlib.sha256()
    digest.update(data[:PREFIX_SIZE])
    digest.update(data[FIXED_SIZE:total])
    if digest.digest() != data[PREFIX_SIZE:FIXED_SIZE]:
        raise ChecksumMismatch("frame checksum does not match its contents")
    try:
        header = json.loads(data[FIXED_SIZE : FIXED_SIZE + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedFrame(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise MalformedFrame("frame header is not a JSON object")
    payload = data[FIXED_SIZE + hlen : total]
    tensors: dict[str, Any] = {}
    if payload:
        _check_payload_header(payload)
        try:
            if as_torch:
                from safetensors.torch import load as st_load_torch

                tensors = st_load_torch(payload)
            else:
                tensors = st_load_np(payload)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise MalformedFrame(f"tensor payload unreadable: {e}") from None
    return Frame(header=header, tensors=tensors)
