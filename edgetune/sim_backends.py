"""The simulator's models: one instance each, adapter states swapped in and out.

"head"  the cached-feature model: the frozen pruned encoder's mean-pooled sentence features,
        computed once and cached on disk (safetensors, keyed by text), feed a trainable head
        (a dense + tanh with a peft LoRA adapter, then a new classifier).
"full"  the real edge classifier, trained with models.train.train_local.

Part of the in-process simulator (edgetune/simulate.py has the overview).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.strategies import StateDict
from data.records import LabelledText
from edgetune.sim_config import SimConfig
from models.classifier import ClassifierSpec, adapter_state, load_adapter_state
from models.train import EvalResult, TrainResult, sgd_loop, trainable_parameters

# -- cached sentence features ("head" model) ------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("EDGETUNE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetune"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _cache_file(spec: ClassifierSpec, cache_dir: Path) -> tuple[Path, str]:
    from models.classifier import resolve_model

    model = resolve_model(spec.model)
    ident = f"{model}|layers={spec.num_layers}|max_length={spec.max_length}|mean-pool|v1"
    return cache_dir / f"features-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.safetensors", ident


@torch.no_grad()
def _encode_features(spec: ClassifierSpec, texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states of the frozen pruned encoder, (len(texts), hidden) fp32.

    A fresh LoRA adapter is the identity (B = 0), so these are also the adapted encoder's
    outputs before any training."""
    from models.classifier import load_base, load_tokenizer

    base = load_base(spec)
    encoder = getattr(base, base.base_model_prefix).to(device).eval()
    tok = load_tokenizer(spec)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
    out = torch.zeros(len(texts), base.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        h = encoder(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        out[idx] = ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
    return out


def sentence_features(spec: ClassifierSpec, texts: Sequence[str], *, cache_dir: Path | None = None,
                      device: str = "cpu", log: Callable[[str], None] | None = None) -> torch.Tensor:
    """Features for `texts` (rows in the same order), computing only those not in the cache.

    The cache is one safetensors file per (model, layers, max_length), keyed by a hash of each
    text; written atomically, never unpickled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, ident = _cache_file(spec, cache_dir)
    keys: list[str] = []
    feats = torch.zeros(0)
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("ident") == ident:
                    keys = json.loads(meta["keys"])
                    feats = f.get_tensor("features")
        except Exception:  # a torn or foreign file: recompute
            keys, feats = [], torch.zeros(0)
    row = {k: i for i, k in enumerate(keys)}
    want = [text_key(t) for t in texts]
    missing: dict[str, str] = {}
    for k, t in zip(want, texts):
        if k not in row and k not in missing:
            missing[k] = t
    if missing:
        t0 = time.perf_counter()
        if log:
            log(f"computing encoder features for {len(missing)} texts (cached in {path.parent})")
        new = _encode_features(spec, list(missing.values()), device=device)
        feats = torch.cat([feats.reshape(-1, new.shape[1]), new]) if len(keys) else new
        for k in missing:
            row[k] = len(keys)
            keys.append(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"ident": ident, "keys": json.dumps(keys)})
        os.replace(tmp, path)
        if log:
            log(f"features done in {time.perf_counter() - t0:.0f}s")
    return feats[torch.tensor([row[k] for k in want], dtype=torch.long)]


# -- backends: one model instance, adapter states swapped in and out ----------------------------------


class HeadModule(nn.Module):
    """dense (hidden x hidden) + tanh + classifier, over pooled sentence features."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, num_labels)
        return self.classifier(torch.tanh(self.dense(x)))


def _pooler_init(spec: ClassifierSpec) -> dict[str, torch.Tensor] | None:
    """The checkpoint's pooler.dense weights, read from its safetensors (no model build)."""
    from safetensors import safe_open

    from models.classifier import resolve_model

    p = Path(resolve_model(spec.model)) / "model.safetensors"
    if not p.exists():
        return None
    with safe_open(str(p), "pt") as f:
        names = list(f.keys())
        w = [n for n in names if n.endswith("pooler.dense.weight")]
        b = [n for n in names if n.endswith("pooler.dense.bias")]
        if not w or not b:
            return None
        return {"weight": f.get_tensor(w[0]).float(), "bias": f.get_tensor(b[0]).float()}


@dataclass
class _Tensors:
    x: torch.Tensor  # (n, hidden)
    y: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.y)


class _OneThread:
    """Run tiny tensor ops on one thread: with a (384, 384) layer the OpenMP fork/join costs
    more than the work, and on busy shared cores 2 threads made a step 10x slower."""

    def __enter__(self) -> None:
        self._n = torch.get_num_threads()
        if self._n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self._n != 1:
            torch.set_num_threads(self._n)


class HeadBackend:
    """The cached-feature model (see the module docstring)."""

    kind = "head"

    def __init__(self, spec: ClassifierSpec, examples: Sequence[LabelledText] = (), *, cache_dir: Path | None = None,
                 device: str = "cpu", log: Callable[[str], None] | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        self.spec, self.cache_dir, self.device, self.log = spec, cache_dir, device, log
        self._row: dict[str, int] = {}
        self._x = torch.zeros(0)
        self._add_texts([e.text for e in examples])
        torch.manual_seed(spec.seed)  # the new classifier: the same init in every process
        head = HeadModule(self.hidden, spec.num_labels)
        init = _pooler_init(spec)
        if init is not None and tuple(init["weight"].shape) == tuple(head.dense.weight.shape):
            head.dense.load_state_dict(init)
        cfg = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                         target_modules=["dense"], modules_to_save=["classifier"])
        self.model = get_peft_model(head, cfg)
        self.model.eval()
        self.initial_state = self.state()

    @property
    def hidden(self) -> int:
        if not len(self._row):
            from transformers import AutoConfig

            from models.classifier import resolve_model

            return AutoConfig.from_pretrained(resolve_model(self.spec.model)).hidden_size
        return self._x.shape[1]

    def _add_texts(self, texts: Iterable[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self._row))
        if not new:
            return
        feats = sentence_features(self.spec, new, cache_dir=self.cache_dir, device=self.device, log=self.log)
        base = len(self._row)
        self._x = torch.cat([self._x, feats]) if base else feats
        for i, t in enumerate(new):
            self._row[t] = base + i

    def data(self, examples: Sequence[LabelledText]) -> _Tensors:
        """Feature rows and labels for these examples (features computed or read from the cache
        for texts not seen yet)."""
        self._add_texts(e.text for e in examples)
        idx = torch.tensor([self._row[e.text] for e in examples], dtype=torch.long)
        return _Tensors(self._x[idx], torch.tensor([e.label for e in examples], dtype=torch.long))

    def state(self) -> StateDict:
        return adapter_state(self.model)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, dict(state))

    def train(self, data: _Tensors, *, epochs: int, max_steps: int, batch_size: int, lr: float, seed: int,
              proximal: Callable[[], torch.Tensor] | None = None) -> TrainResult:
        """models.train.train_local's loop over feature rows: AdamW, shuffled by `seed`, batches
        of `batch_size`, cross-entropy (+ `proximal`), at most `max_steps` steps (0: no cap)."""
        if not len(data):
            raise ValueError("no examples to train on")
        with _OneThread():
            return self._train(data, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                               proximal=proximal)

    def _train(self, data: _Tensors, *, epochs: int, max_steps: int, batch_size: int, lr: float, seed: int,
               proximal: Callable[[], torch.Tensor] | None) -> TrainResult:
        model = self.model

        def batch_loss(idx: list[int]) -> torch.Tensor:
            b = torch.tensor(idx, dtype=torch.long)
            loss = F.cross_entropy(model(data.x[b]), data.y[b])
            return loss + proximal() if proximal is not None else loss

        model.train()
        try:
            return sgd_loop(trainable_parameters(model), len(data), batch_loss, epochs=epochs, max_steps=max_steps,
                            batch_size=batch_size, lr=lr, seed=seed)
        finally:
            model.eval()

    @torch.no_grad()
    def evaluate(self, data: _Tensors) -> EvalResult:
        if not len(data):
            return EvalResult(math.nan, math.nan, 0)
        self.model.eval()
        with _OneThread():
            logits = self.model(data.x).float()
        return EvalResult(float((logits.argmax(-1) == data.y).float().mean()), float(F.cross_entropy(logits, data.y)), len(data))


class FullBackend:
    """The real classifier (models.classifier.build_classifier), trained with train_local."""

    kind = "full"

    def __init__(self, spec: ClassifierSpec, examples: Sequence[LabelledText] = (), **_: Any) -> None:
        from models.classifier import build_classifier, load_tokenizer

        self.spec, self.log = spec, None
        self.model = build_classifier(spec)
        self.model.eval()
        self.tokenizer = load_tokenizer(spec)
        self.initial_state = self.state()

    def data(self, examples: Sequence[LabelledText]) -> list[LabelledText]:
        return list(examples)

    def state(self) -> StateDict:
        return adapter_state(self.model)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, dict(state))

    def train(self, data: list[LabelledText], *, epochs: int, max_steps: int, batch_size: int, lr: float, seed: int,
              proximal: Callable[[], torch.Tensor] | None = None) -> TrainResult:
        from models.train import train_local

        return train_local(self.model, self.tokenizer, data, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                           lr=lr, max_length=self.spec.max_length, seed=seed, proximal=proximal)

    def evaluate(self, data: list[LabelledText]) -> EvalResult:
        from models.train import evaluate

        return evaluate(self.model, self.tokenizer, data, max_length=self.spec.max_length)


_BACKENDS: dict[tuple, Any] = {}


def make_backend(cfg: SimConfig, examples: Sequence[LabelledText] = (), log: Callable[[str], None] | None = None, *,
                 shared: bool = True):
    """The model for `cfg` (one instance per process when `shared`: runs reset it to its initial
    adapter state, so they can follow one another; it is not for concurrent use)."""
    spec = cfg.spec
    labels = {e.label for e in examples}
    if labels and max(labels) + 1 > spec.num_labels:
        spec = replace(spec, num_labels=max(labels) + 1)
    key = (cfg.model, spec, str(cfg.cache_dir), cfg.device)
    if shared and key in _BACKENDS:
        backend = _BACKENDS[key]
        backend.log = log
        return backend
    if cfg.model == "head":
        backend = HeadBackend(spec, examples, cache_dir=cfg.cache_dir, device=cfg.device, log=log)
    else:
        backend = FullBackend(spec, examples)
    if shared:
        _BACKENDS[key] = backend
    return backend


