"""Dynamic int8 of an exported classifier graph, with an accuracy guard on calibration texts.

`quantize_int8(folder / "model.onnx")` writes `model.int8.onnx` beside it and records what it chose
in model_meta.json. It reads and writes ONNX graphs only (onnx, onnxruntime, numpy, tokenizers): no
torch. The graph rewrite is `_Int8Builder`; the guard's measurements on calibration texts are
`_Calibration`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from models.onnx_folder import INT8_FILE, META_FILE, TOKENIZER_FILE, read_meta, write_meta

# MatMul nodes of the feed-forward blocks in the TorchScript export: BERT and RoBERTa name them
# intermediate/dense and output/dense, DistilBERT ffn/lin1 and ffn/lin2. Pass as `exclude_matching`
# to keep them in fp32.
FFN_NODES = r"/intermediate/dense/|/layer\.\d+/output/dense/|/ffn/lin[12]/"

INT8_BLOCK = 32  # MatMulNBits block along K: one weight scale (and one activation scale) per 32 values
_MS_DOMAIN = "com.microsoft"


def _qa(a):
    """uint8 asymmetric per-tensor fake quantization: what DynamicQuantizeLinear does to `a`."""
    import numpy as np

    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.rint(-lo / scale)
    return (np.clip(np.rint(a / scale) + zp, 0, 255) - zp) * scale


def _per_column_int8(w):
    """[K, N] fp32 -> (int8 [K, N], scale float32 [N]), symmetric per output column."""
    import numpy as np

    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _blockwise_uint8(w, block: int):
    """[K, N] fp32 -> MatMulNBits(bits=8) B uint8 [N, K/block, block] (zero point 128) and scales [N * K/block]."""
    import numpy as np

    k, n = w.shape
    kb = -(-k // block)
    wt = np.zeros((n, kb * block), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, kb, block)
    scale = np.abs(wt).max(axis=2) / 127.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wt / scale[:, :, None]), -127, 127) + 128).astype(np.uint8)
    return q, scale.reshape(-1).astype(np.float32)


class _Int8Builder:
    """Builds the int8 graph from the fp32 one, in memory, for any choice of per-node kernels.

    - Embedding tables (Gather on a float initializer of >= 65,536 values): int8 with one scale
      per row (a weight-only Gather + Cast + Mul; onnxruntime's own Gather quantization uses one
      scale for the whole table, which alone flips ~0.3% of predictions on this model).
    - Each MatMul with a constant 2-D weight is either "dynamic" (com.microsoft
      DynamicQuantizeMatMul: int8 weights per output column, the activation quantized to uint8
      at run time with one scale per tensor: what quantize_dynamic's graph fuses to),
      "blockwise" (com.microsoft MatMulNBits, bits=8, accuracy_level=4: int8 weights and
      run-time int8 activations with one scale per block of `INT8_BLOCK` values of each row, so
      an outlier channel only coarsens its own block; same file size, slower on x86 today), or
      "fp32" (left as it is).
    - Gemm (the pooler and the classifier head, 0.15 M weights) stays fp32.
    """

    def __init__(self, fp32_path: Path) -> None:
        import onnx

        self.model = onnx.load(str(fp32_path))
        graph = self.model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.matmuls = [
            n.name for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in self.inits and len(self.inits[n.input[1]].dims) == 2
        ]
        self.gemms = [n.name for n in graph.node if n.op_type == "Gemm"]

    def weight(self, node_name: str):
        from onnx import numpy_helper

        node = next(n for n in self.model.graph.node if n.name == node_name)
        return numpy_helper.to_array(self.inits[node.input[1]]).astype("float32")

    def build(self, modes: dict[str, str], block: int = INT8_BLOCK):
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        used = {}  # initializers the rewritten nodes still read, by name
        nodes, extra = [], []
        for node in graph.node:
            data = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if data is not None and len(data.dims) == 2 and axis == 0 and data.data_type == TensorProto.FLOAT and np.prod(data.dims) >= 65536:
                w = numpy_helper.to_array(data).astype(np.float32)
                scale = np.abs(w).max(axis=1) / 127.0
                scale[scale == 0] = 1.0
                base, out, name = node.input[0], node.output[0], node.name
                extra += [
                    numpy_helper.from_array(np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), base + "_int8"),
                    numpy_helper.from_array(scale.astype(np.float32), base + "_row_scale"),
                    numpy_helper.from_array(np.array([-1], np.int64), base + "_last_axis"),
                ]
                nodes += [
                    helper.make_node("Gather", [base + "_int8", node.input[1]], [out + "_int8"], name=name + "_int8"),  # [B, T, D]
                    helper.make_node("Gather", [base + "_row_scale", node.input[1]], [out + "_scale"], name=name + "_scale"),  # [B, T]
                    helper.make_node("Cast", [out + "_int8"], [out + "_float"], name=name + "_cast", to=TensorProto.FLOAT),
                    helper.make_node("Unsqueeze", [out + "_scale", base + "_last_axis"], [out + "_scale3"], name=name + "_unsqueeze"),
                    helper.make_node("Mul", [out + "_float", out + "_scale3"], [out], name=name + "_dequantize"),
                ]
                continue
            mode = modes.get(node.name, "fp32") if node.op_type == "MatMul" else "fp32"
            if mode == "dynamic":
                q, scale = _per_column_int8(self.weight(node.name))
                b = node.input[1]
                extra += [numpy_helper.from_array(q, b + "_int8"), numpy_helper.from_array(scale, b + "_scale"),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), b + "_zero_point")]
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], b + "_int8", b + "_scale", b + "_zero_point"],
                                              list(node.output), name=node.name + "_int8", domain=_MS_DOMAIN))
                continue
            if mode == "blockwise":
                w = self.weight(node.name)
                q, scale = _blockwise_uint8(w, block)
                b = node.input[1]
                extra += [numpy_helper.from_array(q, b + "_q8"), numpy_helper.from_array(scale, b + "_q8_scale")]
                nodes.append(helper.make_node("MatMulNBits", [node.input[0], b + "_q8", b + "_q8_scale"], list(node.output),
                                              name=node.name + "_int8", domain=_MS_DOMAIN, K=w.shape[0], N=w.shape[1],
                                              bits=8, block_size=block, accuracy_level=4))
                continue
            if mode != "fp32":
                raise ValueError(f"unknown int8 mode {mode!r} for {node.name}")
            nodes.append(node)
        for n in nodes:
            for i in n.input:
                if i in inits:
                    used[i] = inits[i]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(list(used.values()) + extra)
        if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
        return model


class _Calibration:
    """fp32 reference logits and MatMul inputs on calibration texts, through onnxruntime."""

    def __init__(self, builder: _Int8Builder, model_dir: Path, texts: Sequence[str], batch_size: int = 64) -> None:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import helper
        from tokenizers import Tokenizer

        meta = read_meta(model_dir)
        tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        tok.no_padding()
        tok.enable_truncation(max_length=int(meta["max_length"]))
        tok.enable_padding(pad_id=int(meta.get("pad_id", 0)), pad_token=meta.get("pad_token", "[PAD]"))
        texts = sorted(texts, key=len)  # similar lengths per batch: little padding
        self.feeds = []
        for i in range(0, len(texts), batch_size):
            encs = tok.encode_batch(texts[i : i + batch_size])
            f = {
                "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
            }
            self.feeds.append({k: f[k] for k in meta["inputs"]})
        self.n = len(texts)
        # fp32 run that also returns the input of every weight MatMul
        model = onnx.ModelProto()
        model.CopyFrom(builder.model)
        node_by_name = {n.name: n for n in model.graph.node}
        self.inputs = {name: node_by_name[name].input[0] for name in builder.matmuls}
        tensors = sorted(set(self.inputs.values()))
        for t in tensors:
            model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        sess = _session(model)
        self.acts: dict[str, list] = {t: [] for t in tensors}
        logits = []
        rng = np.random.default_rng(0)
        for f in self.feeds:
            outs = sess.run(["logits"] + tensors, f)
            logits.append(outs[0])
            for t, a in zip(tensors, outs[1:]):
                a2 = a.reshape(-1, a.shape[-1])
                # 64 rows per batch for the error estimate, plus each channel's extremes so that
                # the per-tensor range is the batch's own
                rows = a2[rng.choice(len(a2), min(64, len(a2)), replace=False)]
                self.acts[t].append(np.concatenate([rows, a2.min(0)[None], a2.max(0)[None]]))
        self.ref = np.concatenate(logits)

    def dynamic_error(self, builder: _Int8Builder, node_name: str) -> float:
        """Relative error of the node's output when run as DynamicQuantizeMatMul (numpy simulation)."""
        import numpy as np

        w = builder.weight(node_name)
        q, scale = _per_column_int8(w)
        wq = q.astype(np.float32) * scale
        num = den = 0.0
        for a in self.acts[self.inputs[node_name]]:
            ref = a @ w
            num += float(np.sum((_qa(a) @ wq - ref) ** 2))
            den += float(np.sum(ref**2))
        return (num / max(den, 1e-30)) ** 0.5

    def agreement(self, model) -> tuple[float, float]:
        """(argmax agreement with fp32, max |logit difference|) of `model` on the calibration texts."""
        import numpy as np

        sess = _session(model)
        got = np.concatenate([sess.run(["logits"], f)[0] for f in self.feeds])
        return float(np.mean(got.argmax(1) == self.ref.argmax(1))), float(np.abs(got - self.ref).max())


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])




def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path | None = None,
    *,
    calibration_texts: Sequence[str] | None = None,
    target_agreement: float = 0.999,
    nodes_to_exclude: Sequence[str] = (),
    exclude_matching: str | None = None,
    blockwise: Sequence[str] | str = (),
    log=None,
) -> Path:
    """Dynamic int8 (int8 weights, activations quantized at run time) with an accuracy guard.

    Every MatMul with a constant weight starts as onnxruntime's dynamic int8 kernel
    (DynamicQuantizeMatMul: per-column int8 weights, one activation scale per tensor); the
    embedding tables become int8 with one scale per row; the pooler/classifier Gemms stay fp32
    (see `_Int8Builder`). Nodes named in `nodes_to_exclude` or matching the regex
    `exclude_matching` stay fp32; `blockwise` (names, or "all") start as MatMulNBits int8.

    With `calibration_texts` (draw them from the TRAINING split, never the test split) the
    export is guarded: the nodes are ranked by their simulated dynamic-int8 output error on those
    texts, and the most sensitive ones are switched to the block-wise int8 kernel (per-token,
    per-32-values activation scales: ~5x less error, same file size, slower), the fewest that
    bring the argmax agreement with the fp32 graph on the calibration texts to
    `target_agreement` (or all of them). Why: on the VADER test split, plain dynamic int8
    (quantize_dynamic, per-channel QInt8) agreed with torch on 99.36% for a model trained 40 steps
    but 98.1% for one trained 100 steps (larger logits, same relative error); keeping the FFN
    fp32 gave 99.6% / 99.2%. The nodes chosen, the calibration agreement and the sizes go to
    model_meta.json.

    Writes `model.int8.onnx` beside the fp32 file unless `out_path` is given, and records it in
    the folder's model_meta.json when there is one. Returns the int8 file's path.
    """
    import onnx

    src = Path(fp32_path)
    dst = Path(out_path) if out_path is not None else src.with_name(INT8_FILE)
    builder = _Int8Builder(src)
    exclude = _excluded(builder.matmuls, nodes_to_exclude, exclude_matching)
    candidates = [n for n in builder.matmuls if n not in exclude]
    start_blockwise = candidates if blockwise == "all" else [n for n in candidates if n in set(blockwise)]
    modes = {n: "dynamic" for n in candidates} | {n: "blockwise" for n in start_blockwise}
    calib_info = None
    if calibration_texts:
        modes, model, calib_info = _guard(builder, modes, src.parent, list(calibration_texts), target_agreement,
                                          len(start_blockwise), log or (lambda msg: None))
    else:
        model = builder.build(modes)
    onnx.save(model, str(dst))
    if (dst.parent / META_FILE).exists():
        _record_int8(src, dst, builder, modes, exclude, calib_info)
    return dst


def _excluded(matmuls: list[str], names: Sequence[str], matching: str | None) -> list[str]:
    """The MatMuls kept fp32: those named (and present), then those matching the regex, in graph order."""
    exclude = [n for n in names if n in matmuls]
    if matching:
        pattern = re.compile(matching)
        exclude += [n for n in matmuls if pattern.search(n) and n not in exclude]
    return exclude


def _guard(builder: _Int8Builder, modes: dict[str, str], model_dir: Path, texts: list[str], target_agreement: float,
           n_start_blockwise: int, say: Callable[[str], None]):
    """(modes, int8 model, calibration record): the fewest most-sensitive dynamic nodes switched to block-wise
    that reach `target_agreement` with the fp32 graph on `texts` (or all of them)."""
    t0 = time.perf_counter()
    cal = _Calibration(builder, model_dir, texts)
    errors = {n: cal.dynamic_error(builder, n) for n in modes if modes[n] == "dynamic"}
    ranked = sorted(errors, key=lambda n: -errors[n])
    tried = []
    k, step = 0, 1
    while True:
        trial = dict(modes) | {n: "blockwise" for n in ranked[:k]}
        model = builder.build(trial)
        agree, max_diff = cal.agreement(model)
        tried.append({"blockwise_nodes": k + n_start_blockwise, "agreement": round(agree, 5),
                      "max_logit_diff": round(max_diff, 5)})
        say(f"int8 guard: {k} nodes block-wise, calibration agreement {agree:.4f}, max |logit diff| {max_diff:.3f}")
        if agree >= target_agreement or k >= len(ranked):
            break
        k = min(len(ranked), k + step)
        step *= 2  # 1, 2, 4, 8, ... more nodes: few trials; at most twice the fewest
    info = {
        "texts": cal.n,
        "target_agreement": target_agreement,
        "agreement": round(agree, 5),
        "max_logit_diff": round(max_diff, 5),
        "reached": agree >= target_agreement,
        "trials": tried,
        "dynamic_error_by_node": {n: round(errors[n], 5) for n in ranked},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return trial, model, info


def _record_int8(src: Path, dst: Path, builder: _Int8Builder, modes: dict[str, str], exclude: list[str],
                 calib_info: dict | None) -> None:
    """Name the int8 file and what the quantisation chose in the folder's model_meta.json."""
    meta = json.loads((dst.parent / META_FILE).read_text())
    meta.setdefault("files", {})["int8"] = dst.name
    meta["int8"] = {
        "method": "dynamic int8: com.microsoft DynamicQuantizeMatMul (per-column int8 weights, per-tensor uint8 "
                  f"activations) and MatMulNBits (bits 8, block {INT8_BLOCK}, accuracy_level 4) where the guard "
                  "chose it; embeddings int8 per row; Gemm head fp32",
        "nodes_dynamic": [n for n in builder.matmuls if modes.get(n) == "dynamic"],
        "nodes_blockwise": [n for n in builder.matmuls if modes.get(n) == "blockwise"],
        "nodes_kept_fp32": exclude + builder.gemms,
        "calibration": calib_info,
        "bytes": dst.stat().st_size,
        "fp32_bytes": src.stat().st_size,
    }
    write_meta(dst.parent, meta)
