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

A signed frame (format version 2, broker.signing) has the same layout followed by an 80-byte
trailer: the signing key's id (8 bytes), the signing time in milliseconds since the epoch
(8 bytes) and an Ed25519 signature (64 bytes) over the frame's digest, the key id, the time and
the topic it was published on. `decode` reads the trailer into `Frame.signature`; whether it is
valid, and from a trusted key, is for `broker.signing.Verifier` to say.

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
SIGNED_FRAME_VERSION = 2  # FRAME_VERSION + a signature trailer
_PREFIX = struct.Struct(">4sHIQ")  # magic, version, header length, payload length
PREFIX_SIZE = _PREFIX.size  # 18
DIGEST_SIZE = 32
FIXED_SIZE = PREFIX_SIZE + DIGEST_SIZE  # 50
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
_TRAILER = struct.Struct(">8sQ64s")  # key id, signed at (ms), Ed25519 signature
TRAILER_SIZE = _TRAILER.size  # 80

# dtypes a frame may carry, by safetensors name
SUPPORTED_DTYPES = ("F32", "F16", "BF16", "I8", "I64", "I32", "U8", "BOOL")


@dataclass(frozen=True)
class FrameSignature:
    """A signed frame's trailer, as read: unverified until broker.signing.Verifier checks it."""

    key_id: bytes  # 8 bytes: broker.signing.key_id of the public key
    signed_at_ms: int
    signature: bytes  # 64 bytes
    digest: bytes  # the frame's sha256 digest (from its fixed header, checked against its contents)


@dataclass
class Frame:
    """A decoded frame: the JSON header as a dict and the tensors by name."""

    header: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)  # torch.Tensor or np.ndarray
    signature: FrameSignature | None = None  # a signed frame's trailer (None: unsigned)


def signed_bytes(digest: bytes, key_id: bytes, signed_at_ms: int, context: str) -> bytes:
    """What a frame's Ed25519 signature covers: a domain tag, the topic (`context`), the frame's
    digest (which covers its header and tensors), the key id and the signing time."""
    return b"".join((b"edgetune-frame-signature/1\0", context.encode(), b"\0", digest,
                     key_id, signed_at_ms.to_bytes(8, "big")))


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch")


def _tensors_to_bytes(tensors: dict[str, Any]) -> bytes:
    if not tensors:
        return b""
    if any(_is_torch(t) for t in tensors.values()):
        from safetensors.torch import save as st_save_torch

        return st_save_torch({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return st_save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def encode(header: dict[str, Any] | Any, tensors: dict[str, Any] | None = None, *, signer: Any = None,
           context: str = "") -> bytes:
    """Encode a header (dict or pydantic model) and named tensors into one frame. With a `signer`
    (broker.signing.Signer) the frame is signed for the topic `context` it will be published on."""
    if hasattr(header, "model_dump"):
        header = header.model_dump(mode="json")
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    payload = _tensors_to_bytes(tensors or {})
    version = FRAME_VERSION if signer is None else SIGNED_FRAME_VERSION
    prefix = _PREFIX.pack(MAGIC, version, len(hbytes), len(payload))
    digest = hashlib.sha256()
    digest.update(prefix)
    digest.update(hbytes)
    digest.update(payload)
    parts = [prefix, digest.digest(), hbytes, payload]
    if signer is not None:
        signed_at = signer.now_ms()
        sig = signer.sign(signed_bytes(parts[1], signer.key_id, signed_at, context))
        parts.append(_TRAILER.pack(signer.key_id, signed_at, sig))
    return b"".join(parts)


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
    if version not in (FRAME_VERSION, SIGNED_FRAME_VERSION):
        raise UnsupportedVersion(
            f"frame format version {version}; this build reads versions {FRAME_VERSION} and "
            f"{SIGNED_FRAME_VERSION} (signed): upgrade the older side"
        )
    body = FIXED_SIZE + hlen + plen
    total = body + (TRAILER_SIZE if version == SIGNED_FRAME_VERSION else 0)
    if total > max_size:
        raise OversizedFrame(f"frame declares {total} bytes, over the limit of {max_size}")
    if len(data) < total:
        raise TruncatedFrame(f"frame declares {total} bytes but {len(data)} arrived")
    if len(data) > total:
        raise MalformedFrame(f"{len(data) - total} trailing bytes after the frame")
    digest = hashlib.sha256()
    digest.update(data[:PREFIX_SIZE])
    digest.update(data[FIXED_SIZE:body])
    if digest.digest() != data[PREFIX_SIZE:FIXED_SIZE]:
        raise ChecksumMismatch("frame checksum does not match its contents")
    signature = None
    if version == SIGNED_FRAME_VERSION:
        key_id, signed_at, sig = _TRAILER.unpack_from(data, body)
        signature = FrameSignature(key_id, signed_at, sig, data[PREFIX_SIZE:FIXED_SIZE])
    try:
        header = json.loads(data[FIXED_SIZE : FIXED_SIZE + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedFrame(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise MalformedFrame("frame header is not a JSON object")
    payload = data[FIXED_SIZE + hlen : body]
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
    return Frame(header=header, tensors=tensors, signature=signature)
