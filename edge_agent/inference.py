"""Serving predictions on the device with ONNX Runtime, and swapping models with a rollback.

This module imports onnxruntime, numpy and `tokenizers` only: a device that serves
predictions never loads torch or transformers (tests check `sys.modules` in a fresh process).
A model folder is what `models.onnx_export.export_onnx` writes: model.onnx (and
model.int8.onnx after `models.onnx_int8.quantize_int8`), tokenizer.json and model_meta.json.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.onnx_folder import FP32_FILE, INT8_FILE, META_FILE, TOKENIZER_FILE  # no torch there

DEFAULT_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE}


class ModelLoadError(RuntimeError):
    """The model folder is missing a file or does not load; the message says which."""


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxPredictor:
    """Text classifier over an exported model folder.

    precision: "auto" (int8 when the folder has it, else fp32), "int8" or "fp32".
    threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    Thread-safe: `predict` may be called from several threads at once.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        precision: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model_dir = Path(model_dir)
        meta_path = self.model_dir / META_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{meta_path} is missing: is {self.model_dir} a folder written by export_onnx?") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{meta_path} is not valid JSON ({e}): re-export the model") from None
        files = {**DEFAULT_FILES, **self.meta.get("files", {})}
        if precision == "auto":
            precision = "int8" if "int8" in self.meta.get("files", {}) else "fp32"
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'int8', not {precision!r}")
        self.precision = precision
        self.model_path = self.model_dir / files[precision]
        if not self.model_path.exists():
            hint = " (run models.onnx_int8.quantize_int8 on the fp32 model)" if precision == "int8" else ""
            raise ModelLoadError(f"{self.model_path} is missing{hint}")

        self.labels: tuple[str, ...] = tuple(self.meta["labels"])
        self.max_length = int(self.meta["max_length"])
        self.input_names: tuple[str, ...] = tuple(self.meta.get("inputs", ("input_ids", "attention_mask")))
        self.version = self.meta.get("adapter_version")
        self.batch_size = max(1, int(batch_size))

        tok_path = self.model_dir / TOKENIZER_FILE
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception for a missing/bad file
            raise ModelLoadError(f"cannot load {tok_path}: {e}") from None
        # The shipped tokenizer.json may carry its own (fixed-length) padding: pad to the
        # longest text of each batch instead, and truncate at the model's max_length.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length)
        tok.enable_padding(pad_id=int(self.meta.get("pad_id", 0)), pad_token=self.meta.get("pad_token", "[PAD]"))
        self.tokenizer = tok

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelLoadError(f"onnxruntime cannot load {self.model_path}: {e}") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(self.input_names):
            raise ModelLoadError(f"{self.model_path} takes inputs {sorted(graph_inputs)}, meta says {list(self.input_names)}")

    def __repr__(self) -> str:
        return f"OnnxPredictor({str(self.model_dir)!r}, precision={self.precision!r}, version={self.version!r})"

    @staticmethod
    def _as_list(texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        out = list(texts)
        for t in out:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        return out

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids for one batch: {input name: int64 [B, T]}, T = longest text (<= max_length)."""
        encs = self.tokenizer.encode_batch(list(texts))
        feeds = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
        }
        return {k: feeds[k] for k in self.input_names}

    def logits(self, texts: str | Sequence[str]) -> np.ndarray:
        """float32 [N, num_labels], in the order of `texts`; runs in batches of `batch_size` texts
        of similar length (a batch pads to its longest: see models.train.predict_logits)."""
        items = self._as_list(texts)
        if not items:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        parts = []
        for i in range(0, len(order), self.batch_size):
            (out,) = self.session.run(["logits"], self.encode([items[j] for j in order[i : i + self.batch_size]]))
            parts.append(out)
        by_length = np.concatenate(parts).astype(np.float32, copy=False)
        logits = np.empty_like(by_length)
        logits[order] = by_length
        return logits

    def predict(self, texts: str | Sequence[str]) -> tuple[list[int], np.ndarray]:
        """(label indices, probabilities float32 [N, num_labels]); `self.labels[i]` names index i."""
        probs = _softmax(self.logits(texts).astype(np.float64)).astype(np.float32)
        return [int(i) for i in probs.argmax(axis=-1)], probs

    def label_names(self, ids: Sequence[int]) -> list[str]:
        return [self.labels[i] for i in ids]


def accuracy(predictor, texts: Sequence[str], labels: Sequence[int | str]) -> float:
    """Share of `texts` whose predicted label equals `labels` (indices or names)."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ValueError("no texts to evaluate on")
    want = [_label_index(predictor.labels, y) for y in labels]
    got, _ = predictor.predict(list(texts))
    return float(np.mean(np.asarray(got) == np.asarray(want)))


def _label_index(labels: Sequence[str], y: int | str) -> int:
    if isinstance(y, str):
        if y not in labels:
            raise ValueError(f"unknown label {y!r}: the model's labels are {list(labels)}")
        return labels.index(y)
    if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)) or not 0 <= int(y) < len(labels):
        raise ValueError(f"label {y!r} is not one of 0..{len(labels) - 1} or {list(labels)}")
    return int(y)


@dataclass(frozen=True)
class SwapResult:
    accepted: bool
    reason: str  # "accepted", "worse", "labels_differ", "load_failed", "first_model"
    current_dir: Path | None  # the folder serving after the call
    previous_dir: Path | None  # the folder a `rollback()` would go back to
    candidate_dir: Path
    candidate_accuracy: float | None
    current_accuracy: float | None  # of the model that served before the call
    tolerance: float
    holdout_size: int
    detail: str = ""


class ModelSlot:
    """The model in service and the one before it; a new one replaces it only if it holds up.

    `swap` loads the candidate, measures it and the current model on a small local holdout, and
    keeps the candidate only if its accuracy is at least the current one's minus `tolerance`;
    otherwise the current model stays (and the candidate is dropped). A candidate that does not
    load, or has other labels, never replaces the current model. `predict`/`logits` go to the
    current model, so the slot can be handed to the HTTP API as its predictor.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, *, tolerance: float = 0.01, loader=OnnxPredictor) -> None:
        if not 0 <= tolerance <= 1:
            raise ValueError("tolerance is an accuracy difference in [0, 1]")
        self.tolerance = float(tolerance)
        self._loader = loader
        self._lock = threading.Lock()  # guards swaps; readers take a reference to `_current`
        self._current = loader(model_dir) if model_dir is not None else None
        self._previous = None

    @property
    def current(self):
        if self._current is None:
            raise ModelLoadError("no model is installed yet: install or swap one in first")
        return self._current

    @property
    def current_dir(self) -> Path | None:
        return self._current.model_dir if self._current is not None else None

    @property
    def previous_dir(self) -> Path | None:
        return self._previous.model_dir if self._previous is not None else None

    # the predictor interface, delegated to the model in service
    @property
    def labels(self) -> tuple[str, ...]:
        return self.current.labels

    @property
    def version(self):
        return self._current.version if self._current is not None else None

    @property
    def backend(self) -> str:
        return getattr(self._current, "backend", "onnxruntime")

    def predict(self, texts):
        return self.current.predict(texts)

    def logits(self, texts):
        return self.current.logits(texts)

    def label_names(self, ids):
        return self.current.label_names(ids)

    def install(self, model_dir: str | os.PathLike) -> None:
        """Put a model in service without a check (e.g. the first one); the old one becomes previous."""
        new = self._loader(model_dir)
        with self._lock:
            self._previous, self._current = self._current, new

    def rollback(self) -> bool:
        """Go back to the previous model; False if there is none."""
        with self._lock:
            if self._previous is None:
                return False
            self._current, self._previous = self._previous, self._current
            return True

    def swap(self, new_dir: str | os.PathLike, holdout_texts: Sequence[str], holdout_labels: Sequence[int | str]) -> SwapResult:
        new_dir = Path(new_dir)
        texts, ys = list(holdout_texts), list(holdout_labels)
        if len(texts) != len(ys):
            raise ValueError(f"{len(texts)} holdout texts but {len(ys)} labels")
        if not texts:
            raise ValueError("the holdout is empty: swap needs labelled local examples (use install() to skip the check)")
        with self._lock:
            old = self._current

            def result(accepted, reason, cand_acc=None, cur_acc=None, detail=""):
                return SwapResult(
                    accepted, reason, self.current_dir, self.previous_dir, new_dir,
                    cand_acc, cur_acc, self.tolerance, len(texts), detail,
                )

            try:
                cand = self._loader(new_dir)
            except Exception as e:
                return result(False, "load_failed", detail=f"{type(e).__name__}: {e}")
            if old is not None and tuple(cand.labels) != tuple(old.labels):
                return result(False, "labels_differ", detail=f"candidate labels {list(cand.labels)}, current {list(old.labels)}")
            try:
                cand_acc = accuracy(cand, texts, ys)
            except Exception as e:
                return result(False, "load_failed", detail=f"candidate failed on the holdout: {type(e).__name__}: {e}")
            if old is None:
                self._current = cand
                return result(True, "first_model", cand_acc)
            cur_acc = accuracy(old, texts, ys)
            if cand_acc + 1e-12 < cur_acc - self.tolerance:
                return result(
                    False, "worse", cand_acc, cur_acc,
                    f"candidate accuracy {cand_acc:.4f} < current {cur_acc:.4f} - tolerance {self.tolerance}: kept the current model",
                )
            self._previous, self._current = old, cand
            return result(True, "accepted", cand_acc, cur_acc)
