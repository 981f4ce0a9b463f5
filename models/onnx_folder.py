"""The exported model folder: its file names and model_meta.json (no torch: the device reads it too).

    model.onnx          fp32 graph (`models.onnx_export.export_onnx`)
    model.int8.onnx     optional int8 graph (`models.onnx_int8.quantize_int8`)
    tokenizer.json      the fast tokenizer (the `tokenizers` library loads it)
    model_meta.json     labels, max_length, inputs, the source adapter version, files
"""

from __future__ import annotations

import json
from pathlib import Path

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "model_meta.json"
META_FORMAT = 1


def write_meta(out_dir: Path, meta: dict) -> Path:
    path = out_dir / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)
    return path


def read_meta(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / META_FILE).read_text())
