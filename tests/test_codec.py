import hashlib
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import codec
from broker.errors import (BadMagic, ChecksumMismatch, FrameError, MalformedFrame, OversizedFrame, TruncatedFrame,
                           UnsupportedVersion)
from broker.messages import ModelUpdate, parse, SchemaError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 5, generator=g) * 50).to(dtype)
    frame = codec.decode(codec.encode({"kind": "t", "n": 1}, {"x": x, "scalar": torch.tensor(3.0)}))
    assert frame.header == {"kind": "t", "n": 1}
    assert frame.tensors["x"].dtype == dtype
    assert torch.equal(frame.tensors["x"], x)
    assert float(frame.tensors["scalar"]) == 3.0


def test_round_trip_numpy_and_empty_payload():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = codec.decode(codec.encode({"a": 1}, {"a": a}), as_torch=False)
    assert np.array_equal(f.tensors["a"], a)
    f = codec.decode(codec.encode({"only": "header"}))
    assert f.tensors == {} and f.header == {"only": "header"}


def _frame():
    return codec.encode({"kind": "t"}, {"x": torch.ones(4)})


def test_truncated_frame_refused():
    data = _frame()
    for cut in (0, 10, codec.FIXED_SIZE, len(data) - 1):
        with pytest.raises(TruncatedFrame):
            codec.decode(data[:cut])


def test_oversized_frame_refused():
    data = _frame()
    with pytest.raises(OversizedFrame):
        codec.decode(data, max_size=len(data) - 1)
    # a header that declares a huge payload is refused before anything is read
    huge = bytearray(data)
    struct.pack_into(">Q", huge, 10, 2**40)
    with pytest.raises(OversizedFrame):
        codec.decode(bytes(huge))


def test_wrong_checksum_refused():
    data = bytearray(_frame())
    data[-1] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        codec.decode(bytes(data))


def test_wrong_frame_version_refused():
    data = bytearray(_frame())
    struct.pack_into(">H", data, 4, codec.SIGNED_FRAME_VERSION + 1)
    digest = hashlib.sha256(bytes(data[:18]) + bytes(data[50:])).digest()
    data[18:50] = digest  # a well-formed frame of another version
    with pytest.raises(UnsupportedVersion):
        codec.decode(bytes(data))


def test_bad_magic_and_trailing_bytes():
    with pytest.raises(BadMagic):
        codec.decode(b"GARBAGE!" * 10)
    with pytest.raises(MalformedFrame):
        codec.decode(_frame() + b"x")


def test_wrong_protocol_version_and_schema():
    good = ModelUpdate(agent_id="a1", round=1, base_version=0, num_examples=3, nonce="n" * 16)
    header = codec.decode(codec.encode(good)).header
    assert parse(header, ModelUpdate) == good
    with pytest.raises(UnsupportedVersion):
        parse({**header, "protocol": 99}, ModelUpdate)
    with pytest.raises(SchemaError, match="num_examples"):
        parse({**header, "num_examples": -1}, ModelUpdate)
    with pytest.raises(SchemaError):
        parse({**header, "unexpected": 1}, ModelUpdate)


def test_unsupported_tensor_dtype_refused():
    # a checksummed frame whose safetensors header names a dtype we do not accept (F64)
    from safetensors.numpy import save

    payload = save({"x": np.zeros(2, dtype=np.float64)})
    with pytest.raises(MalformedFrame, match="dtype"):
        codec.decode(_checksummed_frame(b"{}", payload))


def _checksummed_frame(hbytes: bytes, payload: bytes) -> bytes:
    """A frame whose prefix and checksum are right, whatever its header and payload hold."""
    prefix = struct.pack(">4sHIQ", codec.MAGIC, codec.FRAME_VERSION, len(hbytes), len(payload))
    return prefix + hashlib.sha256(prefix + hbytes + payload).digest() + hbytes + payload


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_a_typed_error(data):
    try:
        codec.decode(data)
    except FrameError:
        pass


@settings(max_examples=200, deadline=1000)
@given(st.binary(min_size=1, max_size=512), st.integers(min_value=0, max_value=10_000))
def test_corrupted_valid_frames_give_a_typed_error(noise, pos):
    data = bytearray(_frame())
    pos %= len(data)
    data[pos : pos + len(noise)] = noise
    try:
        codec.decode(bytes(data))
    except FrameError:
        pass


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=256), st.binary(max_size=1024))
def test_checksummed_garbage_inside_gives_a_typed_error(hbytes, payload):
    # the checksum is right, so the decoder has to survive whatever the header and payload hold
    try:
        codec.decode(_checksummed_frame(hbytes, payload))
    except FrameError:
        pass


@settings(max_examples=200, deadline=1000)
@given(st.dictionaries(st.text(min_size=1, max_size=8),
                       st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I8", "F16"]),
                                              "shape": st.lists(st.integers(-2, 6), max_size=3),
                                              "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3)}),
                       max_size=3),
       st.binary(max_size=64))
def test_lying_safetensors_headers_give_a_typed_error(meta, body):
    import json as _json

    h = _json.dumps(meta).encode()
    payload = struct.pack("<Q", len(h)) + h + body
    hbytes = b"{}"
    try:
        codec.decode(_checksummed_frame(hbytes, payload))
    except FrameError:
        pass
