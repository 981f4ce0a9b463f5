"""Export the edge classifier (LoRA merged into its base) to ONNX (int8: models.onnx_int8).

A model folder written here is everything the device needs to serve predictions without torch
or transformers (see `edge_agent.inference.OnnxPredictor`):

    model.onnx          fp32 graph: inputs input_ids, attention_mask[, token_type_ids: BERT family only]
                        (int64, [batch, sequence], both axes dynamic); output logits [batch, labels]
    model.int8.onnx     optional, from `models.onnx_int8.quantize_int8`: int8 weights, activations quantized at run time
    tokenizer.json      the fast tokenizer (the `tokenizers` library loads it)
    model_meta.json     labels, max_length, inputs, the source adapter version, files

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. The torch.export-based
exporter (torch's default since 2.9) needs the `onnxscript` package, which the agent extra does
not install; the TorchScript exporter works offline with torch alone and gives the same graph
for this model. The model is traced with eager attention (not SDPA) so that the attention mask
stays a graph input on every path, and with a padded batch so padding is exercised.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from models.families import encoder_family
# the folder's names, and the int8 step, importable from here as before
from models.onnx_folder import (FP32_FILE, INT8_FILE, META_FILE, META_FORMAT, TOKENIZER_FILE,  # noqa: F401
                                read_meta, write_meta)
from models.onnx_int8 import FFN_NODES, INT8_BLOCK, quantize_int8  # noqa: F401

# Texts of different lengths, so the traced batch is padded (attention_mask has zeros).
_TRACE_TEXTS = (
    "ok",
    "The battery lasts two days and the screen is sharp, but the speaker is disappointing.",
)


class ExportError(RuntimeError):
    pass


class _LogitsOnly(nn.Module):
    """Positional inputs in, logits out: the signature the ONNX graph gets."""

    def __init__(self, model: nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.with_token_types = with_token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # [B, T] int64 each
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs, return_dict=True).logits  # [B, num_labels]


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with any peft LoRA merged into the base weights; `model` is untouched."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    m.eval()
    return m


def _labels(model: nn.Module, labels: Sequence[str] | None) -> list[str]:
    n = int(model.config.num_labels)
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != n:
            raise ExportError(f"{len(labels)} label names given for a model with {n} labels")
        return labels
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]


def export_onnx(
    peft_model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    max_length: int = 64,
    opset: int = 17,
    adapter_version: int | str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Merge the LoRA (on a copy), export fp32 ONNX, save tokenizer.json and model_meta.json.

    `peft_model` is a peft sequence classifier (or a plain transformers one); `tokenizer` a
    transformers *fast* tokenizer. `adapter_version` is recorded as the model's source (the
    global adapter version it was built from). Returns the path of `model.onnx`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is not a fast tokenizer: the device needs a tokenizer.json")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model = merged_copy(peft_model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"
    # The family decides the graph's inputs (UnsupportedModel for a model of none): BERT takes
    # token_type_ids; DistilBERT and RoBERTa/XLM-R do not (RoBERTa's positions, offset past the
    # padding id, are computed from input_ids inside the graph).
    input_names = list(encoder_family(model.config).inputs)
    with_tt = "token_type_ids" in input_names
    enc = tokenizer(list(_TRACE_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    if with_tt:  # one segment: zeros, which is what the device's tokenizer gives too
        args += (enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes["logits"] = {0: "batch"}

    onnx_path = out / FP32_FILE
    wrapper = _LogitsOnly(model, with_tt).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and about Python booleans in
        # transformers' mask code; neither depends on the traced shapes for this model.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(onnx_path),
            input_names=input_names,
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )

    backend.save(str(out / TOKENIZER_FILE))
    pad_token = getattr(tokenizer, "pad_token", None) or "[PAD]"
    pad_id = getattr(tokenizer, "pad_token_id", None)
    meta = {
        "format": META_FORMAT,
        "labels": _labels(model, labels),
        "max_length": int(max_length),
        "inputs": input_names,
        "pad_token": pad_token,
        "pad_id": int(pad_id if pad_id is not None else 0),
        "adapter_version": adapter_version,
        "model_type": getattr(model.config, "model_type", None),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {"fp32": FP32_FILE},
    }
    write_meta(out, meta)
    return onnx_path


def export_int8(model: nn.Module, tokenizer, out_dir: str | Path, *, max_length: int = 64,
                adapter_version: int | str | None = None, labels: Sequence[str] | None = None) -> Path:
    """The folder an agent serves (`edge_agent.inference.OnnxPredictor`): `export_onnx`, then
    `quantize_int8`, then the fp32 graph removed (4x the int8 file's size) and dropped from
    model_meta.json's files. Returns the folder."""
    out = Path(out_dir)
    quantize_int8(export_onnx(model, tokenizer, out, max_length=max_length, adapter_version=adapter_version,
                              labels=labels))
    (out / FP32_FILE).unlink()
    meta = json.loads((out / META_FILE).read_text())
    meta["files"].pop("fp32", None)
    write_meta(out, meta)
    return out
