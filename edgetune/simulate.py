"""In-process federated simulator: the service's strategies and learning modes without a broker.

N simulated agents, each with a shard of the training split (data/partition.py), train one
shared model instance in turn: the simulator swaps adapter states in and out
(`load_adapter_state` / `adapter_state`) instead of building N models, and hands the agents'
states to the same pure pieces the MQTT service uses (aggregator/strategies.py,
aggregator/privacy.py, aggregator/async_buffer.py, aggregator/rounds.select_agents).

Modes (`SimConfig.mode`):

    fedavg       each round the selected agents train from the global; `strategy` (any name in
                 aggregator.strategies.STRATEGIES, options in `strategy_options`) combines them
    fedprox      fedavg + the agents' proximal term mu/2 ||w - w_global||^2 (`prox_mu`)
    fedadam      fedavg with strategy "fedadam" (server Adam on the mean delta)
    sequential   the adapter passes from agent to agent within a round (selected agents in
                 agent order); the last agent's adapter is the new global
    independent  each agent trains its own adapter and never aggregates; a round's accuracy
                 is the mean over agents of their own model's held-out accuracy (per-agent
                 numbers in the row's "agents")
    centralized  one model on the pooled training data; each round it sees exactly as many
                 examples as the round's agents saw together (a seeded sample of the pool, one
                 pass in batches of batch_size, from a fresh AdamW as the agents' rounds do)
    async        FedBuff (AsyncBuffer): agents of different speeds (`speeds`, seconds per local
                 step, simulated time) train from whatever global is current when they start
                 and send when done; every `buffer_size` updates make a server step (a
                 "round" in the metrics). It runs rounds * buffer_size local updates in all,
                 then flushes what is left.

Participation (sync modes): each round k = max(min_agents, round(participation * N)) agents,
chosen with `select_agents(agents, k, round, seed)`, the service's seeded selection.

Attackers: `attackers` agents (chosen with a seeded generator, `SimResult.attackers`) replace
their honest delta d = w_trained - w_global by `attack_scale * d` (attack="scale") or by
`-flip_scale * d` (attack="flip") before sending.

Differential privacy: strategy "dp_fedavg" with strategy_options clip_norm and
noise_multiplier; the simulator fills in num_agents = N (so the accountant's sample rate is
n / N each round), seed = the run's seed and delta = 1e-5 unless given, and records the
accountant's epsilon after every round.

Models (`SimConfig.model`):

    "full"  the real edge classifier (MiniLM pruned to spec.num_layers, LoRA r=8 on
            query/value, classifier head), trained with models.train.train_local.
    "head"  the cached-feature model, for tests and quick comparisons: the frozen pruned
            encoder's mean-pooled sentence embeddings, computed once and cached on disk
            (safetensors, keyed by text), feed a trainable head = a 384x384 dense + tanh
            (initialised from the checkpoint's pooler) with a peft LoRA adapter (same r and
            alpha as the spec) on the dense, then a new linear classifier (peft
            modules_to_save), exactly as the real model's adapter. Same optimizer, batching,
            seeds and loss as train_local. It learns what a LoRA head on a frozen encoder can
            learn (about 0.80 on VADER), not what adapting the encoder adds.

Output: `output/metrics.jsonl`, one JSON row per round in the service's format (round,
outcome, selected, answered, dropped, accuracy, loss, eval_examples, eval_seconds, version,
num_examples, train_loss, aggregation_s, duration_s), plus "mode", "strategy" and per-agent
metrics under "agents" ({agent: {steps, examples, train_loss, update_norm, attacker, and
accuracy/loss where evaluated}}), DP and robust-strategy diagnostics where they apply; and
`output/accuracy.png`, held-out accuracy per round. Round 0 is the initial global.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.strategies import ClientUpdate, StateDict, apply_delta, delta_of, global_norm, make_strategy
from data.sentiment import Example
from models.classifier import ClassifierSpec, adapter_state, load_adapter_state
from models.train import EvalResult, TrainResult, proximal_term, sgd_loop, trainable_parameters

MODES = ("fedavg", "fedprox", "fedadam", "sequential", "independent", "centralized", "async")
ATTACKS = ("scale", "flip")
MODELS = ("head", "full")
DEFAULT_DP_DELTA = 1e-5


class SimulationError(ValueError):
    """A configuration the simulator cannot run; the message says what to change."""


# -- configuration --------------------------------------------------------------------------------


@dataclass
class SimConfig:
    mode: str = "fedavg"
    strategy: str | None = None  # None: fedavg (fedadam in mode "fedadam")
    strategy_options: dict = field(default_factory=dict)
    agents: int = 5
    rounds: int = 10
    partition: str = "iid"  # iid, dirichlet, by-domain
    alpha: float = 0.5  # dirichlet concentration
    participation: float = 1.0  # fraction of agents per round (sync modes)
    min_agents: int = 1
    local_epochs: int = 1
    local_steps: int = 10  # cap on each agent's steps per round (0: whole epochs)
    batch_size: int = 32
    lr: float = 5e-3  # the agents' AdamW learning rate (the service's agents use 5e-3)
    prox_mu: float = 0.0  # FedProx mu (mode "fedprox" needs > 0)
    attackers: int = 0  # how many agents poison their updates
    attack: str | None = None  # "scale" or "flip"
    attack_scale: float = 10.0  # attack="scale": send attack_scale * delta
    flip_scale: float = 1.0  # attack="flip": send -flip_scale * delta
    # async (mode "async")
    buffer_size: int = 3
    speeds: Sequence[float] | None = None  # seconds per local step, per agent (default 1.0 each)
    staleness_weight: str = "polynomial"
    staleness_a: float = 0.5
    server_lr: float = 1.0
    max_staleness: int = 10
    redeliver: float = 0.0  # chance an update is delivered twice (MQTT QoS 1); the buffer refuses the copy
    # model and data
    model: str = "head"
    spec: ClassifierSpec = field(default_factory=ClassifierSpec)
    data: str | None = None  # None: VADER; else a .jsonl/.csv file with text, label[, domain]
    train_limit: int = 0  # use a seeded sample of this many training examples (0: all)
    eval_limit: int = 0  # and of this many held-out examples (0: all)
    data_seed: int = 0  # seeds those two samples (apart from `seed`, so runs of other seeds share data)
    eval_agents: bool | None = None  # also evaluate each agent's local model on the held-out split
    # (before any poisoning); None: yes for "head" (cheap), no for "full". Always in "independent".
    seed: int = 0
    output: Path | None = None  # metrics.jsonl and accuracy.png go here (None: nowhere)
    plot: bool = True
    keep_trace: bool = False  # keep every update and global in SimResult.trace (tests)
    cache_dir: Path | None = None  # feature cache ("head"); None: $EDGETUNE_CACHE_DIR or ~/.cache/edgetune
    device: str = "cpu"  # where features are computed ("head")

    def resolved_strategy(self) -> str:
        if self.mode == "fedadam":
            if self.strategy not in (None, "fedadam"):
                raise SimulationError(f"mode 'fedadam' runs strategy fedadam; got strategy {self.strategy!r} (use mode 'fedavg' for other strategies)")
            return "fedadam"
        return self.strategy or "fedavg"

    def check(self) -> None:
        if self.mode not in MODES:
            raise SimulationError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.model not in MODELS:
            raise SimulationError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.agents < 1 or self.rounds < 1:
            raise SimulationError("agents and rounds must be at least 1")
        if not 0 < self.participation <= 1:
            raise SimulationError(f"participation must be in (0, 1], got {self.participation}")
        if not 1 <= self.min_agents <= self.agents:
            raise SimulationError(f"min_agents must be in [1, agents={self.agents}], got {self.min_agents}")
        if self.local_steps < 0 or self.local_epochs < 1:
            raise SimulationError("local_steps must be >= 0 and local_epochs >= 1")
        if self.mode == "fedprox" and self.prox_mu <= 0:
            raise SimulationError("mode 'fedprox' needs prox_mu > 0 (e.g. 0.01)")
        if self.prox_mu < 0:
            raise SimulationError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.attackers:
            if self.attack not in ATTACKS:
                raise SimulationError(f"attackers={self.attackers} needs attack in {ATTACKS}, got {self.attack!r}")
            if not 0 < self.attackers <= self.agents:
                raise SimulationError(f"attackers must be in [0, agents={self.agents}], got {self.attackers}")
            if self.mode in ("centralized", "independent"):
                raise SimulationError(f"mode {self.mode!r} aggregates nothing: attackers do not apply")
        elif self.attack is not None and self.attack not in ATTACKS:
            raise SimulationError(f"unknown attack {self.attack!r}; choose one of {ATTACKS}")
        if self.mode == "async":
            if self.strategy not in (None, "fedavg"):
                raise SimulationError("mode 'async' aggregates with the FedBuff buffer: leave strategy unset")
            if self.speeds is not None and len(self.speeds) != self.agents:
                raise SimulationError(f"speeds has {len(self.speeds)} entries for {self.agents} agents")
            if self.speeds is not None and min(self.speeds) <= 0:
                raise SimulationError("speeds (seconds per local step) must be positive")
            if not 0 <= self.redeliver < 1:
                raise SimulationError("redeliver must be in [0, 1)")
        if self.mode in ("sequential", "independent", "centralized") and self.strategy not in (None, "fedavg"):
            raise SimulationError(f"mode {self.mode!r} does not aggregate with a strategy; leave strategy unset")
        self.resolved_strategy()


@dataclass
class SimResult:
    config: SimConfig
    rows: list[dict]  # the metrics rows, round 0 first
    final_state: StateDict  # the global adapter at the end (the initial one in "independent")
    agent_ids: list[str]
    attackers: list[str]
    agent_states: dict[str, StateDict] = field(default_factory=dict)  # "independent": each agent's own adapter
    trace: list[dict] = field(default_factory=list)  # keep_trace: per round / per update records
    seconds: float = 0.0
    metrics_path: Path | None = None
    plot_path: Path | None = None

    @property
    def accuracies(self) -> list[float]:
        """Held-out accuracy after each round, round 0 (initial) first."""
        return [r["accuracy"] for r in self.rows if "accuracy" in r]

    @property
    def accuracy(self) -> float:
        return self.accuracies[-1]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows if "loss" in r]


# -- data -----------------------------------------------------------------------------------------


def load_examples(path: str | Path) -> tuple[Example, ...]:
    """Read a user's labelled texts: .jsonl (objects with text, label[, domain][, id]) or .csv
    (header with text, label[, domain][, id]). String labels are mapped to 0..K-1 in sorted order."""
    p = Path(path)
    if not p.exists():
        raise SimulationError(f"data file {p} does not exist")
    if p.suffix in (".jsonl", ".ndjson"):
        with open(p, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
    elif p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    else:
        raise SimulationError(f"data file {p}: use .jsonl or .csv with columns text, label[, domain]")
    if not raw or any("text" not in r or "label" not in r for r in raw):
        raise SimulationError(f"data file {p}: every record needs 'text' and 'label'")
    labels = [r["label"] for r in raw]
    if all(isinstance(x, int) or (isinstance(x, str) and x.strip().lstrip("-").isdigit()) for x in labels):
        ints = [int(x) for x in labels]
        if min(ints) < 0:
            raise SimulationError(f"data file {p}: integer labels must be >= 0")
    else:
        names = sorted({str(x) for x in labels})
        ints = [names.index(str(x)) for x in labels]
    out = []
    for i, (r, y) in enumerate(zip(raw, ints)):
        domain = str(r.get("domain") or "data")
        out.append(Example(str(r["text"]).strip(), y, domain, f"{domain}:{r.get('id', i)}"))
    return tuple(out)


def load_splits(cfg: SimConfig) -> tuple[list[Example], list[Example]]:
    """The training and held-out examples (the fixed hash split of data/sentiment.py), each
    optionally cut to a seeded sample of train_limit / eval_limit (file order kept)."""
    from data.sentiment import train_test_split

    examples = load_examples(cfg.data) if cfg.data else None
    train, test = train_test_split(examples)
    if cfg.train_limit and cfg.train_limit < len(train):
        keep = sorted(random.Random(f"{cfg.data_seed}:train").sample(range(len(train)), cfg.train_limit))
        train = [train[i] for i in keep]
    if cfg.eval_limit and cfg.eval_limit < len(test):
        keep = sorted(random.Random(f"{cfg.data_seed}:eval").sample(range(len(test)), cfg.eval_limit))
        test = [test[i] for i in keep]
    if not train or not test:
        raise SimulationError(f"need training and held-out examples, got {len(train)} and {len(test)}")
    return train, test


def make_shards(cfg: SimConfig, train: Sequence[Example]) -> list[list[Example]]:
    from data.partition import partition

    parts = partition(cfg.partition, labels=[e.label for e in train], domains=[e.domain for e in train],
                      k=cfg.agents, seed=cfg.seed, alpha=cfg.alpha)
    shards = [[train[i] for i in p] for p in parts]
    empty = [i for i, s in enumerate(shards) if not s]
    if empty:
        raise SimulationError(
            f"partition {cfg.partition!r} left agents {[f'agent-{i + 1}' for i in empty]} without examples: "
            "use fewer agents, more data or another partition"
        )
    return shards


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

    def __init__(self, spec: ClassifierSpec, examples: Sequence[Example] = (), *, cache_dir: Path | None = None,
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

    def data(self, examples: Sequence[Example]) -> _Tensors:
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

    def __init__(self, spec: ClassifierSpec, examples: Sequence[Example] = (), **_: Any) -> None:
        from models.classifier import build_classifier, load_tokenizer

        self.spec, self.log = spec, None
        self.model = build_classifier(spec)
        self.model.eval()
        self.tokenizer = load_tokenizer(spec)
        self.initial_state = self.state()

    def data(self, examples: Sequence[Example]) -> list[Example]:
        return list(examples)

    def state(self) -> StateDict:
        return adapter_state(self.model)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, dict(state))

    def train(self, data: list[Example], *, epochs: int, max_steps: int, batch_size: int, lr: float, seed: int,
              proximal: Callable[[], torch.Tensor] | None = None) -> TrainResult:
        from models.train import train_local

        return train_local(self.model, self.tokenizer, data, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                           lr=lr, max_length=self.spec.max_length, seed=seed, proximal=proximal)

    def evaluate(self, data: list[Example]) -> EvalResult:
        from models.train import evaluate

        return evaluate(self.model, self.tokenizer, data, max_length=self.spec.max_length)


_BACKENDS: dict[tuple, Any] = {}


def make_backend(cfg: SimConfig, examples: Sequence[Example] = (), log: Callable[[str], None] | None = None, *,
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


# -- pure helpers -----------------------------------------------------------------------------------


def poison(current: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], attack: str,
           factor: float) -> StateDict:
    """What an attacker sends: current + m * (tensors - current), with m = factor ("scale") or
    -factor ("flip")."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}")
    m = factor if attack == "scale" else -factor
    return apply_delta(current, delta_of(current, tensors), m)


def agents_per_round(cfg: SimConfig) -> int:
    return min(cfg.agents, max(cfg.min_agents, int(round(cfg.participation * cfg.agents))))


def planned_steps(n: int, *, epochs: int, max_steps: int, batch_size: int) -> tuple[int, int]:
    """(steps, examples seen) of train_local on n examples."""
    per_epoch = math.ceil(n / batch_size)
    steps = epochs * per_epoch if not max_steps else min(max_steps, epochs * per_epoch)
    full, rest = divmod(steps, per_epoch)
    return steps, full * n + rest * batch_size  # a partial epoch has only full batches


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


# -- the simulator ----------------------------------------------------------------------------------


class Simulator:
    """One run of one configuration. `backend` may be shared between runs (compare()): the
    simulator resets it to its initial adapter state first."""

    def __init__(self, cfg: SimConfig, *, backend=None, splits: tuple[list[Example], list[Example]] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.log = log or (lambda s: None)
        self.train_examples, self.test_examples = splits if splits is not None else load_splits(cfg)
        self.shards = make_shards(cfg, self.train_examples)
        self.agent_ids = [f"agent-{i + 1}" for i in range(cfg.agents)]
        self.backend = backend or make_backend(cfg, self.train_examples + self.test_examples, self.log)
        if getattr(self.backend, "log", None) is None:
            self.backend.log = self.log
        self.shard_data = [self.backend.data(s) for s in self.shards]
        self.test_data = self.backend.data(self.test_examples)
        k = cfg.attackers if cfg.attack else 0
        self.attackers = sorted(random.Random(f"{cfg.seed}:attackers").sample(self.agent_ids, k)) if k else []
        self.rows: list[dict] = []
        self.trace: list[dict] = []

    # seeds: agent i (0-based) trains in round r with seed (seed + i) * 100_003 + r, as the
    # service's agents do with EDGETUNE_TRAIN_SEED = seed + i
    def train_seed(self, agent_index: int, round_number: int) -> int:
        return (self.cfg.seed + agent_index) * 100_003 + round_number

    def local_train(self, agent_index: int, round_number: int, data=None, *, anchor: bool = False) -> TrainResult:
        """Train the backend's current adapter as agent `agent_index` would in that round."""
        cfg = self.cfg
        seed = self.train_seed(agent_index, round_number)
        torch.manual_seed(seed)  # dropout in the full model
        proximal = None
        if anchor and cfg.prox_mu > 0:
            params = [p for p in self.backend.model.parameters() if p.requires_grad]
            anchors = [p.detach().clone() for p in params]
            mu = cfg.prox_mu
            proximal = lambda: proximal_term(params, anchors, mu)  # noqa: E731
        return self.backend.train(self.shard_data[agent_index] if data is None else data, epochs=cfg.local_epochs,
                                  max_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                  proximal=proximal)

    # -- output ------------------------------------------------------------------------------------
    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        r = self.backend.evaluate(self.test_data)
        return {"accuracy": r.accuracy, "loss": r.loss, "eval_examples": r.n, "eval_seconds": time.perf_counter() - t0}

    def _record(self, row: dict) -> None:
        row = {"mode": self.cfg.mode, **row} if "mode" not in row else row
        self.rows.append(row)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if "accuracy" in row:
            self.log(f"{self.cfg.mode:>11} round {row['round']:>3}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}")

    def _agent_metrics(self, aid: str, res: TrainResult, n: int, norm: float | None) -> dict:
        m = {"steps": res.steps, "examples": n, "train_loss": res.mean_loss}
        if norm is not None:
            m["update_norm"] = norm
        m["attacker"] = aid in self.attackers
        return m

    def _train_agent(self, i: int, current: StateDict, round_number: int) -> tuple[ClientUpdate, dict]:
        aid = self.agent_ids[i]
        self.backend.load(current)
        res = self.local_train(i, round_number, anchor=True)
        tensors = self.backend.state()
        n = min(res.examples_seen, len(self.shards[i]))
        metrics = self._agent_metrics(aid, res, n, None)
        if self.cfg.eval_agents or (self.cfg.eval_agents is None and self.cfg.model == "head"):
            metrics.update({k: v for k, v in self._evaluate().items() if k in ("accuracy", "loss")})
        if aid in self.attackers:
            tensors = poison(current, tensors, self.cfg.attack,
                             self.cfg.attack_scale if self.cfg.attack == "scale" else self.cfg.flip_scale)
        metrics["update_norm"] = global_norm(delta_of(current, tensors))
        return ClientUpdate(aid, tensors, n, nonce=f"r{round_number}-{aid}"), metrics

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.metrics_path = None
        if cfg.output is not None:
            out = Path(cfg.output)
            out.mkdir(parents=True, exist_ok=True)
            self.metrics_path = out / "metrics.jsonl"
            self.metrics_path.write_text("")
        self.backend.load(self.backend.initial_state)
        self.global_state = self.backend.state()
        self.version = 0
        self._record({"round": 0, "version": 0, **self._evaluate()})
        agent_states: dict[str, StateDict] = {}
        run = {"fedavg": self._run_sync, "fedprox": self._run_sync, "fedadam": self._run_sync,
               "sequential": self._run_sequential, "independent": self._run_independent,
               "centralized": self._run_centralized, "async": self._run_async}[cfg.mode]
        extra = run()
        if cfg.mode == "independent":
            agent_states = extra
        result = SimResult(cfg, self.rows, self.global_state, self.agent_ids, self.attackers, agent_states,
                           self.trace, time.perf_counter() - t0, self.metrics_path)
        if self.metrics_path is not None and cfg.plot:
            title = f"{cfg.mode} ({cfg.resolved_strategy() if cfg.mode in ('fedavg', 'fedprox', 'fedadam') else cfg.mode}), " \
                    f"{cfg.agents} agents, {cfg.partition}, model {cfg.model}"
            result.plot_path = plot_runs({cfg.mode: self.rows}, self.metrics_path.parent / "accuracy.png", title)
        return result

    def _selected(self, round_number: int) -> list[int]:
        from aggregator.rounds import select_agents

        chosen = set(select_agents(self.agent_ids, agents_per_round(self.cfg), round_number, self.cfg.seed))
        return [i for i, a in enumerate(self.agent_ids) if a in chosen]

    def _strategy(self):
        cfg = self.cfg
        name = cfg.resolved_strategy()
        opts = dict(cfg.strategy_options)
        if name == "dp_fedavg":
            if "sampling_rate" not in opts:
                opts.setdefault("num_agents", cfg.agents)
            opts.setdefault("seed", cfg.seed)
            opts.setdefault("delta", DEFAULT_DP_DELTA)
        return make_strategy(name, **opts)

    def _diagnostics(self, strategy) -> dict:
        d: dict[str, Any] = {}
        if strategy.name == "dp_fedavg":
            d.update(clip_norms=strategy.last_clip_norms, unclipped_norms=strategy.last_unclipped_norms,
                     noise_std=strategy.noise_std, sample_rate=strategy.last_sample_rate,
                     noise_multiplier=strategy.options.noise_multiplier, clip_norm=strategy.options.clip_norm,
                     delta=strategy.options.delta, epsilon=_finite(strategy.last_epsilon))
        if hasattr(strategy, "last_selected"):
            d["krum_selected"] = list(strategy.last_selected)
        if hasattr(strategy, "last_clipped"):
            d["clipped"] = list(strategy.last_clipped)
            d["unclipped_norms"] = dict(strategy.last_norms)
        return d

    def _round_row(self, number: int, selected: list[int], agents: dict, t0: float, **extra) -> dict:
        ids = [self.agent_ids[i] for i in selected]
        row = {"round": number, "outcome": "complete", "selected": ids, "answered": list(agents), "dropped": [],
               **self._evaluate(), "version": self.version,
               "num_examples": sum(a["examples"] for a in agents.values()),
               "train_loss": sum(a["train_loss"] for a in agents.values()) / max(len(agents), 1)}
        row.update(extra)
        row["duration_s"] = time.perf_counter() - t0
        row["agents"] = agents
        return row

    def _run_sync(self) -> None:
        cfg = self.cfg
        strategy = self._strategy()
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            updates, agents = [], {}
            for i in selected:
                u, m = self._train_agent(i, self.global_state, r)
                updates.append(u)
                agents[u.agent_id] = m
            ta = time.perf_counter()
            new = strategy.aggregate(self.global_state, sorted(updates, key=lambda u: u.agent_id))
            agg_s = time.perf_counter() - ta
            if cfg.keep_trace:
                self.trace.append({"round": r, "global": self.global_state, "updates": updates, "new": new})
            self.backend.load(new)
            self.global_state = self.backend.state()
            self.version += 1
            self._record(self._round_row(r, selected, agents, t0, strategy=strategy.name, aggregation_s=agg_s,
                                         **self._diagnostics(strategy)))

    def _run_sequential(self) -> None:
        for r in range(1, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            agents = {}
            self.backend.load(self.global_state)
            for i in selected:  # in agent order; each starts from the previous one's adapter
                before = self.backend.state()
                res = self.local_train(i, r)
                after = self.backend.state()
                agents[self.agent_ids[i]] = self._agent_metrics(self.agent_ids[i], res, min(res.examples_seen, len(self.shards[i])),
                                                                global_norm(delta_of(before, after)))
            if self.cfg.keep_trace:
                self.trace.append({"round": r, "global": self.global_state, "order": [self.agent_ids[i] for i in selected]})
            self.global_state = self.backend.state()
            self.version += 1
            self._record(self._round_row(r, selected, agents, t0, strategy="sequential"))

    def _run_independent(self) -> dict[str, StateDict]:
        states = {a: {k: t.clone() for k, t in self.global_state.items()} for a in self.agent_ids}
        evals: dict[str, EvalResult] = {}
        for i, a in enumerate(self.agent_ids):  # untrained: all the same
            evals[a] = self.backend.evaluate(self.test_data) if not evals else next(iter(evals.values()))
        for r in range(1, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            agents = {}
            for i in selected:
                a = self.agent_ids[i]
                self.backend.load(states[a])
                res = self.local_train(i, r)
                new = self.backend.state()
                agents[a] = self._agent_metrics(a, res, min(res.examples_seen, len(self.shards[i])), global_norm(delta_of(states[a], new)))
                states[a] = new
                evals[a] = self.backend.evaluate(self.test_data)
            ev_t0 = time.perf_counter()
            per_agent = {a: {"accuracy": e.accuracy, "loss": e.loss} for a, e in evals.items()}
            for a, m in agents.items():
                m.update(per_agent[a])
            row = {"round": r, "outcome": "complete", "selected": [self.agent_ids[i] for i in selected],
                   "answered": list(agents), "dropped": [],
                   "accuracy": sum(e.accuracy for e in evals.values()) / len(evals),
                   "loss": sum(e.loss for e in evals.values()) / len(evals),
                   "eval_examples": len(self.test_data), "eval_seconds": time.perf_counter() - ev_t0,
                   "version": 0, "num_examples": sum(m["examples"] for m in agents.values()),
                   "train_loss": sum(m["train_loss"] for m in agents.values()) / max(len(agents), 1),
                   "strategy": "none", "accuracy_min": min(e.accuracy for e in evals.values()),
                   "accuracy_max": max(e.accuracy for e in evals.values()), "agent_accuracy": per_agent,
                   "duration_s": time.perf_counter() - t0, "agents": agents}
            self._record(row)
        self.backend.load(self.global_state)
        return states

    def _run_centralized(self) -> None:
        cfg = self.cfg
        n_pool = len(self.train_examples)
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            budget = sum(planned_steps(len(self.shards[i]), epochs=cfg.local_epochs, max_steps=cfg.local_steps,
                                       batch_size=cfg.batch_size)[1] for i in selected)
            # exactly `budget` examples of the pooled data (seeded permutations, repeated if needed),
            # one pass in batches of batch_size
            rng = random.Random(f"{cfg.seed}:centralized:{r}")
            picks: list[int] = []
            while len(picks) < budget:
                perm = list(range(n_pool))
                rng.shuffle(perm)
                picks.extend(perm[: budget - len(picks)])
            data = self.backend.data([self.train_examples[j] for j in picks])
            self.backend.load(self.global_state)
            seed = self.train_seed(0, r)
            torch.manual_seed(seed)
            res = self.backend.train(data, epochs=1, max_steps=0, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
            self.global_state = self.backend.state()
            self.version += 1
            row = {"round": r, "outcome": "complete", "selected": [self.agent_ids[i] for i in selected],
                   "answered": ["pooled"], "dropped": [], **self._evaluate(), "version": self.version,
                   "num_examples": res.examples_seen, "federated_examples": budget, "steps": res.steps,
                   "train_loss": res.mean_loss, "strategy": "centralized"}
            row["duration_s"] = time.perf_counter() - t0
            self._record(row)

    def _run_async(self) -> None:
        from aggregator.async_buffer import AsyncBuffer, StaleUpdate

        cfg = self.cfg
        buf = AsyncBuffer(cfg.buffer_size, cfg.staleness_weight, cfg.staleness_a, global_state=self.global_state,
                          server_lr=cfg.server_lr, max_staleness=cfg.max_staleness)
        speeds = list(cfg.speeds) if cfg.speeds is not None else [1.0] * cfg.agents
        total = cfg.rounds * cfg.buffer_size
        rng = random.Random(f"{cfg.seed}:redeliver")
        heap: list[tuple[float, int, int]] = []  # (finish time, job number, agent index)
        jobs: dict[int, dict] = {}
        started = 0
        counts = [0] * cfg.agents
        if cfg.keep_trace:
            self.trace.append({"globals": {0: dict(buf.global_state)}, "jobs": jobs})
        self.async_stats = {"delivered": 0, "duplicates_refused": 0, "stale_refused": 0, "applied": 0}

        def start(i: int, now: float) -> None:
            nonlocal started
            if started >= total:
                return
            job = started
            started += 1
            counts[i] += 1
            aid = self.agent_ids[i]
            current = buf.global_state
            self.backend.load(current)
            res = self.local_train(i, counts[i])
            tensors = self.backend.state()
            if aid in self.attackers:
                tensors = poison(current, tensors, cfg.attack, cfg.attack_scale if cfg.attack == "scale" else cfg.flip_scale)
            n = min(res.examples_seen, len(self.shards[i]))
            jobs[job] = {"agent": aid, "base_version": buf.version, "nonce": f"{aid}-{counts[i]}", "num_examples": n,
                         "start": now, "finish": now + res.steps * speeds[i], "train_loss": res.mean_loss,
                         "steps": res.steps, "status": "in flight"}
            if cfg.keep_trace:
                jobs[job]["tensors"] = tensors
            jobs[job]["_tensors"] = tensors
            heapq.heappush(heap, (jobs[job]["finish"], job, i))

        def record_step(now: float, t_step: float) -> None:
            self.version = buf.version
            self.backend.load(buf.global_state)
            self.global_state = self.backend.state()
            if cfg.keep_trace:
                self.trace[0]["globals"][buf.version] = self.global_state
            applied = [asdict(a) for a in buf.last_applied]
            agents: dict[str, dict] = {}
            for a in applied:
                m = agents.setdefault(a["agent_id"], {"updates": 0, "examples": 0, "staleness": [], "attacker": a["agent_id"] in self.attackers})
                m["updates"] += 1
                m["examples"] += a["num_examples"]
                m["staleness"].append(a["staleness"])
            ids = [a["agent_id"] for a in applied]
            row = {"round": buf.version, "outcome": "complete", "selected": ids, "answered": ids, "dropped": [],
                   **self._evaluate(), "version": buf.version, "num_examples": sum(a["num_examples"] for a in applied),
                   "strategy": "fedbuff", "time": now, "applied": applied,
                   "max_staleness_seen": max(a["staleness"] for a in applied),
                   "duration_s": time.perf_counter() - t_step, "agents": agents}
            self._record(row)

        for i in range(cfg.agents):
            start(i, 0.0)
        t_step = time.perf_counter()
        now = 0.0
        while heap:
            now, job, i = heapq.heappop(heap)
            j = jobs[job]
            u = ClientUpdate(j["agent"], j.pop("_tensors"), j["num_examples"], base_version=j["base_version"], nonce=j["nonce"])
            copies = 2 if cfg.redeliver and rng.random() < cfg.redeliver else 1
            j["step"] = buf.version + 1  # the server step that will apply it, if taken
            for c in range(copies):
                self.async_stats["delivered"] += 1
                try:
                    new = buf.add(u)
                except StaleUpdate:
                    j["status"] = "stale"
                    self.async_stats["stale_refused"] += 1
                    continue
                except Exception as e:  # DuplicateUpdate on the redelivered copy
                    if getattr(e, "reason", None) == "duplicate" and c > 0:
                        self.async_stats["duplicates_refused"] += 1
                        continue
                    raise
                j["status"] = "applied"
                self.async_stats["applied"] += 1
                if new is not None:
                    record_step(now, t_step)
                    t_step = time.perf_counter()
            start(i, now)
        if buf.flush() is not None:
            record_step(now, t_step)
        for j in jobs.values():
            j.pop("_tensors", None)
        self.async_jobs = jobs


def run_simulation(cfg: SimConfig, *, backend=None, splits=None, log: Callable[[str], None] | None = None) -> SimResult:
    return Simulator(cfg, backend=backend, splits=splits, log=log).run()


def compare(configs: Mapping[str, SimConfig], *, output: Path | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, SimResult]:
    """Run several configurations on the same data and one shared model instance.

    All configs must agree on the model, spec, data and limits (so that splits and the model
    are the same); each run's files go to output/<name>/, and output/accuracy.png overlays them."""
    if not configs:
        raise SimulationError("nothing to compare")
    first = next(iter(configs.values()))
    key = lambda c: (c.model, c.spec, c.data, c.train_limit, c.eval_limit, c.data_seed, c.cache_dir, c.device)  # noqa: E731
    for name, c in configs.items():
        if key(c) != key(first):
            raise SimulationError(f"config {name!r} differs from the first in model, spec, data or data sample; "
                                  "compare runs on one model and one split")
        c.check()
    splits = load_splits(first)
    backend = make_backend(first, splits[0] + splits[1], log)
    results = {}
    for name, c in configs.items():
        if output is not None:
            c = replace(c, output=Path(output) / name)
        results[name] = run_simulation(c, backend=backend, splits=splits, log=log)
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        plot_runs({n: r.rows for n, r in results.items()}, Path(output) / "accuracy.png",
                  f"{first.agents} agents, {first.partition}, model {first.model}")
    return results


# -- plot -----------------------------------------------------------------------------------------


def plot_runs(runs: Mapping[str, Sequence[dict]], png: Path, title: str = "") -> Path:
    """Held-out accuracy per round, one line per run (the style of edgetune.runner.plot_accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rows in runs.items():
        rows = [r for r in rows if "accuracy" in r]
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", markersize=3, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("global held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title or "EdgeTune simulation: accuracy per round", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
