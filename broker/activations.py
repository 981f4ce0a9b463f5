"""Encodings of split-learning tensors (activations at the cut, gradients back) for the wire.

fp32 is exact; fp16 halves the bytes; int8 stores each token's vector as int8 with one fp32
absmax scale per token (x ~= q * scale, |error| <= scale / 2), about a quarter of fp32.
"""

from __future__ import annotations

from typing import Literal

import torch

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS = ("fp32", "fp16", "int8")


def encode(x: torch.Tensor, encoding: Encoding, name: str) -> dict[str, torch.Tensor]:
    x = x.detach().float().cpu()
    if encoding == "fp32":
        return {name: x.contiguous()}
    if encoding == "fp16":
        return {name: x.half().contiguous()}
    if encoding == "int8":
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127.0  # (..., 1) per token
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return {name: q.contiguous(), f"{name}_scale": scale.contiguous()}
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")


class EncodingError(ValueError):
    reason = "bad_tensors"


def decode(tensors: dict[str, torch.Tensor], encoding: Encoding, name: str) -> torch.Tensor:
    """Back to float32; raises EncodingError if the tensors do not match the encoding."""
    t = tensors.get(name)
    if t is None:
        raise EncodingError(f"missing tensor {name!r}")
    want = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}.get(encoding)
    if want is None:
        raise EncodingError(f"unknown encoding {encoding!r}")
    if t.dtype != want:
        raise EncodingError(f"{name}: dtype {t.dtype} does not match encoding {encoding}")
    if encoding == "int8":
        s = tensors.get(f"{name}_scale")
        if s is None or s.dtype != torch.float32 or s.shape != (*t.shape[:-1], 1):
            raise EncodingError(f"{name}_scale missing or of the wrong shape for int8")
        out = t.float() * s
    else:
        out = t.float()
    if not torch.isfinite(out).all():
        err = EncodingError(f"{name} has NaN or Inf values")
        err.reason = "non_finite"
        raise err
    return out


def wire_bytes(x_shape: tuple[int, ...], encoding: Encoding) -> int:
    """Tensor bytes of one encoded activation or gradient of this shape (without framing)."""
    n = 1
    for d in x_shape:
        n *= d
    per = {"fp32": 4, "fp16": 2, "int8": 1}[encoding]
    extra = (n // x_shape[-1]) * 4 if encoding == "int8" else 0
    return n * per + extra
