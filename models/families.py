"""Model families: the one place that knows where a supported model keeps its layers.

Keyed by `config.model_type`. An encoder family (the federated edge classifier) says where its
transformer layers live, how to prune them (and which config field counts them), its default
LoRA target modules (peft's own per-model defaults, `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_
MAPPING`, where peft has one) and the inputs its ONNX graph takes. A decoder family (split mode)
says where the blocks, the final norm and any learned position table live, so the cut is made
by name and not guessed from the module tree.

Both lists are allow-lists: any other model type is refused with `UnsupportedModel`, whose
message lists the supported families, rather than pruned, targeted or split silently wrong.

Pure but for reading a config: no torch or transformers import at module level (modules are
reached by attribute path, and a pruned ModuleList is rebuilt by its own type), so settings and
CLIs can use it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DECODER_FAMILIES", "ENCODER_FAMILIES", "DecoderFamily", "EncoderFamily", "UnsupportedModel",
           "decoder_family", "decoder_family_named", "encoder_family", "model_type_of"]


class UnsupportedModel(ValueError):
    """A model whose type is not in a family allow-list; the message lists the supported ones.

    `reason` suits a metrics label ("unsupported_encoder" or "unsupported_decoder"), like the
    other typed errors (models.adapters.InvalidUpdate); `model_type` is what the config said and
    `supported` the model types that would have been accepted."""

    def __init__(self, reason: str, message: str, model_type: str | None, supported: tuple[str, ...]) -> None:
        super().__init__(message)
        self.reason = reason
        self.model_type = model_type
        self.supported = supported


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get(obj, head) if head else obj, last, value)


def model_type_of(path: str | Path) -> str | None:
    """The model_type in a model's config, without loading it: a folder's config.json read as JSON, a hub
    name through transformers' AutoConfig (which needs the hub or its cache)."""
    cfg = Path(path) / "config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("model_type")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path)).model_type


def _model_type(config_or_type: Any) -> str | None:
    if config_or_type is None or isinstance(config_or_type, str):
        return config_or_type
    return getattr(config_or_type, "model_type", None)


# -- encoders: the edge classifier ---------------------------------------------------------------


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    label: str  # for people: "BERT (MiniLM, TinyBERT)"
    model_types: tuple[str, ...]
    layers: str  # the ModuleList of transformer layers, under the base model (model.<base_model_prefix>)
    layer_count: str  # the config field that counts them (fixed when pruning, so save/from_config agree)
    lora_targets: tuple[str, ...]  # default LoRA target modules (peft matches them by suffix)
    token_type_ids: bool  # whether the model has a segment embedding (an input of its ONNX graph)
    # head modules besides peft's SEQ_CLS defaults ("classifier", "score") that the new task head holds:
    # they are freshly initialised, so they must train and travel with the adapter
    head_modules: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The model's (and its ONNX graph's) inputs, in graph order."""
        return ("input_ids", "attention_mask") + (("token_type_ids",) if self.token_type_ids else ())

    def base(self, model: Any) -> Any:
        """The encoder under a task model (`model.bert`, `model.distilbert`, ...), or `model` if it is one."""
        return getattr(model, getattr(model, "base_model_prefix", ""), model)

    def layer_list(self, model: Any) -> Any:
        return _get(self.base(model), self.layers)

    def prune(self, model: Any, num_layers: int) -> Any:
        """Keep the first `num_layers` layers (0, or as many as there are: keep all); fixes the config's count."""
        layers = self.layer_list(model)
        if num_layers <= 0 or num_layers >= len(layers):
            return model
        _set(self.base(model), self.layers, type(layers)(list(layers)[:num_layers]))  # a ModuleList again
        setattr(model.config, self.layer_count, num_layers)
        return model


ENCODER_FAMILIES: tuple[EncoderFamily, ...] = (
    EncoderFamily("bert", "BERT (also MiniLM, TinyBERT)", ("bert",), "encoder.layer", "num_hidden_layers",
                  ("query", "value"), token_type_ids=True),
    # DistilBERT has no segment embedding; its task head is pre_classifier + classifier, both new
    EncoderFamily("distilbert", "DistilBERT", ("distilbert",), "transformer.layer", "n_layers",
                  ("q_lin", "v_lin"), token_type_ids=False, head_modules=("pre_classifier",)),
    # RoBERTa's type_vocab_size is 1 and its tokenizers give no token_type_ids: the graph takes none.
    # Its positions start after the padding id (computed from input_ids inside the graph).
    EncoderFamily("roberta", "RoBERTa, XLM-R", ("roberta", "xlm-roberta"), "encoder.layer", "num_hidden_layers",
                  ("query", "value"), token_type_ids=False),
)


def _find(families, config_or_type: Any, where: str | None, reason: str, what: str, fix: str):
    """The family in `families` whose model types hold the config's; else UnsupportedModel naming them all."""
    mt = _model_type(config_or_type)
    for fam in families:
        if mt in fam.model_types:
            return fam
    supported = tuple(t for f in families for t in f.model_types)
    listed = "; ".join(f"{f.label} (model_type {', '.join(f.model_types)})" for f in families)
    at = f" ({where})" if where else ""
    raise UnsupportedModel(reason, f"model type {mt!r}{at} is not {what}; supported: {listed}. {fix}", mt, supported)


def encoder_family(config_or_type: Any, where: str | None = None) -> EncoderFamily:
    """The classifier family of a config (or a model_type string); `where` names the model in the error."""
    return _find(ENCODER_FAMILIES, config_or_type, where, "unsupported_encoder", "a supported classifier family",
                 "Point EDGETUNE_MODEL at a folder whose config.json has one of those model types, or leave it unset "
                 "for the shipped MiniLM")


# -- decoders: split mode ------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    label: str
    model_types: tuple[str, ...]
    body: str  # the causal LM's attribute with embeddings, blocks and final norm (GPT2Model, LlamaModel)
    blocks: str  # the ModuleList of blocks, under the body
    norm: str  # the final norm, under the body (the head replaces it by Identity: the tail applies it)
    layer_count: str  # the config field that counts the blocks
    lora_targets: tuple[str, ...]
    # a learned position table under the body that the model adds to inputs_embeds: the head has added
    # it already, so the tail's copy is zeroed (None: positions are rotary, recomputed on each side)
    positions: str | None = None


DECODER_FAMILIES: tuple[DecoderFamily, ...] = (
    # peft matches targets by suffix: "c_proj" would also catch mlp.c_proj, so only c_attn
    DecoderFamily("gpt2", "GPT-2", ("gpt2",), "transformer", "h", "ln_f", "n_layer", ("c_attn",), positions="wpe"),
    DecoderFamily("llama", "Llama family (Llama, Mistral, Qwen2; e.g. SmolLM2)", ("llama", "mistral", "qwen2"),
                  "model", "layers", "norm", "num_hidden_layers", ("q_proj", "v_proj")),
)


def decoder_family(config_or_type: Any, where: str | None = None) -> DecoderFamily:
    """The split family of a config (or a model_type string); `where` names the model in the error."""
    return _find(DECODER_FAMILIES, config_or_type, where, "unsupported_decoder", "supported for split mode",
                 "Point EDGETUNE_SPLIT_MODEL at a folder whose config.json has one of those model types (or use "
                 "gpt2-config or smollm2)")


def decoder_family_named(name: str) -> DecoderFamily:
    """A decoder family by its name ("gpt2", "llama"): what `models.split.family_of` returns."""
    for fam in DECODER_FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"no decoder family named {name!r}: one of {', '.join(f.name for f in DECODER_FAMILIES)}")
