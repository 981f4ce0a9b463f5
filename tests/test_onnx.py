"""ONNX export of the edge classifier and serving it with ONNX Runtime (no torch on that path).

The model under test is the shipped configuration (MiniLM pruned to 4 layers, LoRA r=8 on
query/value, max_length 64) after 40 steps of real LoRA + head training on the VADER training
split (batch 32, lr 3e-3), so that its predictions are spread over both classes. (Training on
texts cut at 32 tokens costs a third less, but that model's int8 agreement is 98.95%, under the
bound below: see INT8_MIN_AGREEMENT.)
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # a missing package fails the run with what to install; it never skips silently
    import onnx
    import onnxruntime  # noqa: F401
    import torch
except ImportError as e:
    raise ImportError(f"{e}: the ONNX tests need the agent extra: pip install -e '.[agent]'") from e
import torch.nn.functional as F  # noqa: E402

from data.sentiment import LABELS, train_test_split  # noqa: E402
from edge_agent.inference import ModelSlot, OnnxPredictor, accuracy  # noqa: E402
from models.classifier import ClassifierSpec, adapter_state, build_classifier, load_tokenizer  # noqa: E402
from models.onnx_export import export_onnx  # noqa: E402
from models.onnx_folder import read_meta  # noqa: E402
from models.onnx_int8 import FFN_NODES, quantize_int8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ClassifierSpec()  # the edge default: 4 layers, max_length 64
TRAIN_STEPS, TRAIN_LR = 40, 3e-3
CALIBRATION_TEXTS = 1024


def _train(model, tok, examples, steps: int, lr: float, seed: int = 0) -> float:
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, 32)
        enc = tok([e.text for e in batch], padding=True, truncation=True, max_length=SPEC.max_length, return_tensors="pt")
        loss = F.cross_entropy(model(**enc).logits, torch.tensor([e.label for e in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def torch_logits(model, tok, texts, batch_size: int = 64) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=SPEC.max_length, return_tensors="pt")
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    t0, c0 = time.perf_counter(), _cpu()
    torch.manual_seed(0)
    train, test = train_test_split()
    model, tok = build_classifier(SPEC), load_tokenizer(SPEC)
    _train(model, tok, train, TRAIN_STEPS, TRAIN_LR)
    before = adapter_state(model)
    d = tmp_path_factory.mktemp("onnx") / "v1"
    t1, c1 = time.perf_counter(), _cpu()
    fp32 = export_onnx(model, tok, d, max_length=SPEC.max_length, labels=LABELS, adapter_version=1)
    calibration = random.Random(2).sample(train, CALIBRATION_TEXTS)  # training texts only
    int8 = quantize_int8(fp32, calibration_texts=[e.text for e in calibration])
    t2, c2 = time.perf_counter(), _cpu()
    print(
        f"\n[fixture] build + {TRAIN_STEPS} training steps {t1 - t0:.1f}s ({c1 - c0:.1f} CPU-s), "
        f"export + int8 {t2 - t1:.1f}s ({c2 - c1:.1f} CPU-s)"
    )
    return SimpleNamespace(model=model, tok=tok, dir=d, fp32=fp32, int8=int8, train=train, test=test, before=before, calibration=calibration)


def test_export_writes_a_self_contained_folder(exported):
    d = exported.dir
    assert {p.name for p in d.iterdir()} >= {"model.onnx", "model.int8.onnx", "tokenizer.json", "model_meta.json"}
    meta = read_meta(d)
    assert meta["labels"] == ["negative", "positive"] and meta["max_length"] == 64 and meta["adapter_version"] == 1
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"} and meta["num_layers"] == 4
    graph = onnx.load(str(exported.fp32), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {n: ["batch", "sequence"] for n in meta["inputs"]}  # dynamic batch and sequence axes
    assert [o.name for o in graph.output] == ["logits"]
    assert exported.int8.stat().st_size < exported.fp32.stat().st_size / 3
    # the caller's peft model was not merged or changed by the export
    assert hasattr(exported.model, "merge_and_unload")
    after = adapter_state(exported.model)
    assert all(torch.equal(exported.before[k], after[k]) for k in exported.before)


def test_tokenizers_library_matches_transformers(exported):
    texts = [e.text for e in exported.test[:300]] + ["x " * 200, "Ünïcödé — “quotes” ☺", "  spaced   out  "]
    p = OnnxPredictor(exported.dir, precision="fp32")
    for i in range(0, len(texts), 50):
        chunk = texts[i : i + 50]
        ours = p.encode(chunk)
        ref = exported.tok(chunk, padding=True, truncation=True, max_length=64, return_tensors="np")
        for k in ours:
            assert np.array_equal(ours[k], ref[k]), k


def test_fp32_logits_match_torch(exported):
    texts = [e.text for e in sorted(exported.test, key=lambda e: -len(e.text))[:16]] + [e.text for e in exported.test[:48]]
    ref = torch_logits(exported.model, exported.tok, texts)  # the unmerged peft model
    p = OnnxPredictor(exported.dir, precision="fp32")
    for bs in (64, 7, 1):  # different batch sizes and padded lengths through the dynamic axes
        p.batch_size = bs
        diff = np.abs(p.logits(texts) - ref).max()
        assert diff <= 1e-4, f"batch {bs}: max |onnx - torch| = {diff:.2e}"
    ids, probs = p.predict(texts)
    assert ids == ref.argmax(1).tolist()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)


# The issue asks for >= 99.5% agreement on the whole test split. Plain dynamic int8
# (quantize_dynamic, per-channel QInt8 weights, every MatMul and the embedding Gather) reached
# 99.36% on this model and 98.1% on one trained 100 steps; keeping the FFN MatMuls fp32, 99.6%
# and 99.2%. The guarded recipe (embeddings int8 per row; the MatMuls most sensitive to
# per-tensor activation scales switched to block-wise int8 until the agreement with fp32 on
# 1,024 training texts reaches 99.9%) reached 99.87% on this model and 99.72% on the 100-step
# one (all 24 MatMuls block-wise there; see BENCHMARKS.md, "Edge inference").
INT8_MIN_AGREEMENT = 0.995


def test_int8_agrees_with_torch_on_the_test_split(exported):
    test = sorted(exported.test, key=lambda e: len(e.text))  # similar lengths batched: less padding
    texts, labels = [e.text for e in test], np.array([e.label for e in test])
    t0, c0 = time.perf_counter(), _cpu()
    ref = torch_logits(exported.model, exported.tok, texts).argmax(1)
    t1, c1 = time.perf_counter(), _cpu()
    got = np.asarray(OnnxPredictor(exported.dir, precision="int8", batch_size=64).predict(texts)[0])
    t2, c2 = time.perf_counter(), _cpu()
    agree = float(np.mean(got == ref))
    print(
        f"\n[int8] {len(texts)} test texts: torch {t1 - t0:.1f}s ({c1 - c0:.1f} CPU-s), "
        f"onnxruntime int8 {t2 - t1:.1f}s ({c2 - c1:.1f} CPU-s); "
        f"agreement {agree:.4f} ({int(np.sum(got != ref))} differ); accuracy torch {np.mean(ref == labels):.3f}, int8 {np.mean(got == labels):.3f}"
    )
    assert len(texts) == len(exported.test) > 3000  # the whole held-out split
    assert 0.1 < ref.mean() < 0.9, "the trained model should predict both classes"
    assert np.mean(ref == labels) > 0.6, "the trained model should beat chance"
    assert agree >= INT8_MIN_AGREEMENT


def test_int8_guard_meta_records_its_choices(exported):
    q = read_meta(exported.dir)["int8"]
    cal = q["calibration"]
    assert cal["texts"] == CALIBRATION_TEXTS and cal["target_agreement"] == 0.999
    # the guard stops at the target, or when every MatMul is block-wise
    assert cal["reached"] == (cal["agreement"] >= 0.999)
    assert cal["reached"] or not q["nodes_dynamic"]
    assert cal["trials"][-1]["agreement"] == cal["agreement"] and cal["trials"][0]["blockwise_nodes"] == 0
    assert all(t["agreement"] < 0.999 for t in cal["trials"][:-1])  # it stopped at the first trial that reached it
    assert len(q["nodes_dynamic"]) + len(q["nodes_blockwise"]) == 24  # 4 layers x q, k, v, attention out, FFN in, FFN out
    assert q["nodes_kept_fp32"] == ["/model/bert/pooler/dense/Gemm", "/model/classifier/Gemm"]
    assert q["bytes"] == exported.int8.stat().st_size and q["fp32_bytes"] == exported.fp32.stat().st_size
    graph = onnx.load(str(exported.int8)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeMatMul") == len(q["nodes_dynamic"]) and ops.count("MatMulNBits") == len(q["nodes_blockwise"])
    assert "QuantizeLinear" not in ops and ops.count("MatMul") == 8  # only the attention score MatMuls stay fp32
    # no fp32 copy of an embedding table or MatMul weight is left in the file: only the pooler's Gemm
    big_float = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 65536]
    assert big_float == ["model.bert.pooler.dense.weight"], big_float
    # the calibration texts are training texts, none from the test split
    assert not {e.uid for e in exported.calibration} & {e.uid for e in exported.test}


def test_quantize_can_keep_the_ffn_in_fp32(exported, tmp_path):
    plain = quantize_int8(exported.fp32, tmp_path / "plain.onnx")  # no calibration: every MatMul dynamic
    mixed = quantize_int8(exported.fp32, tmp_path / "mixed.onnx", exclude_matching=FFN_NODES)

    def count(path, op):
        return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)

    assert count(plain, "DynamicQuantizeMatMul") == 24 and count(plain, "MatMulNBits") == 0
    # 4 layers x (intermediate, output) stay fp32 MatMul instead of DynamicQuantizeMatMul
    assert count(mixed, "MatMul") - count(plain, "MatMul") == 8 and count(mixed, "DynamicQuantizeMatMul") == 16
    assert mixed.stat().st_size > plain.stat().st_size * 1.5


def test_predictor_process_never_imports_torch(exported):
    texts = [e.text for e in exported.test[:8]]
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from edge_agent.inference import ModelSlot, OnnxPredictor
        p = OnnxPredictor({str(exported.dir)!r})
        ids, probs = p.predict({texts!r})
        slot = ModelSlot({str(exported.dir)!r})
        slot.predict({texts!r})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "onnx"))
        print(json.dumps({{"ids": ids, "precision": p.precision, "heavy": heavy}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == [], f"the ONNX path imported {res['heavy']}"
    assert res["precision"] == "int8"  # "auto" serves the int8 model when the folder has one
    assert res["ids"] == OnnxPredictor(exported.dir).predict(texts)[0]


def _model_variant(src: Path, dst: Path, *, negate_head: bool = False, labels=None, version=None) -> Path:
    """A copy of an exported fp32 folder, edited without torch: head negated, labels or version changed."""
    from onnx import numpy_helper

    dst.mkdir(parents=True)
    model = onnx.load(str(src / "model.onnx"))
    if negate_head:  # classifier logits flip sign: the prediction flips on every text
        for init in model.graph.initializer:
            if init.name.startswith("model.classifier."):
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(dst / "model.onnx"))
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    meta = read_meta(src)
    meta["files"] = {"fp32": "model.onnx"}
    meta.pop("int8", None)
    meta["labels"] = list(labels or meta["labels"])
    meta["adapter_version"] = version
    (dst / "model_meta.json").write_text(json.dumps(meta))
    return dst


def test_model_slot_keeps_the_old_model_when_the_new_one_is_worse(exported, tmp_path):
    holdout = random.Random(1).sample(exported.test, 200)  # all four domains
    texts, labels = [e.text for e in holdout], [e.label for e in holdout]
    worse = _model_variant(exported.dir, tmp_path / "v2-worse", negate_head=True, version=2)  # accuracy 1 - acc

    slot = ModelSlot(exported.dir, tolerance=0.02)
    assert slot.current.precision == "int8"
    good_acc = accuracy(slot.current, texts, labels)
    assert good_acc > 0.6
    before = slot.predict(texts)[0]

    r = slot.swap(worse, texts, labels)
    assert not r.accepted and r.reason == "worse", r
    assert r.candidate_accuracy == pytest.approx(1 - r.current_accuracy, abs=0.02)
    assert r.current_accuracy == pytest.approx(good_acc)
    assert r.current_dir == exported.dir and slot.current_dir == exported.dir and slot.version == 1
    assert slot.previous_dir is None
    assert slot.predict(texts)[0] == before

    r = slot.swap(tmp_path / "does-not-exist", texts, labels)
    assert not r.accepted and r.reason == "load_failed" and "model_meta.json" in r.detail
    assert slot.current_dir == exported.dir

    other = _model_variant(exported.dir, tmp_path / "other-labels", labels=["bad", "good"], version=3)
    r = slot.swap(other, texts, labels)
    assert not r.accepted and r.reason == "labels_differ" and slot.current_dir == exported.dir

    # a candidate as good as the current one (the fp32 twin of the int8 model) is accepted
    twin = _model_variant(exported.dir, tmp_path / "v4-fp32", version=4)
    r = slot.swap(twin, texts, labels)
    assert r.accepted and r.reason == "accepted" and r.previous_dir == exported.dir
    assert abs(r.candidate_accuracy - r.current_accuracy) <= 0.02
    assert slot.current_dir == twin and slot.version == 4 and slot.current.precision == "fp32"
    assert slot.rollback() and slot.current_dir == exported.dir and slot.previous_dir == twin

    with pytest.raises(ValueError, match="holdout is empty"):
        slot.swap(twin, [], [])
