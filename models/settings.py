"""The aggregator's settings that define the fleet's model: its task (broker.messages.TaskDefinition),
which agents build their model from (edge_agent.task_model); agents hold none of these settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from common.settings import DEMO_LABELS, LabelSettings

from models.classifier import ClassifierSpec


class LoraSettings(BaseModel):
    """The LoRA adapter, in both modes (the classifier's in federated mode, the head's and tail's in split mode)."""

    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1)


class ModelSettings(LoraSettings, LabelSettings):
    model: str | None = Field(None, description="local model folder or hub name; unset: the shipped MiniLM")
    num_layers: int = Field(4, ge=0, le=48, description="encoder layers kept on the edge (0: all)")
    num_labels: int = Field(2, ge=2)
    max_length: int = Field(64, ge=8, le=512)
    model_seed: int = Field(0, description="seed of the new classifier head (same on every process)")
    @model_validator(mode="after")
    def _labels_fit(self):
        names = self.label_names()
        if len(names) != self.num_labels:
            raise ValueError(f"labels names {len(names)} classes but num_labels is {self.num_labels}: set "
                             "EDGETUNE_NUM_LABELS to the number of names in EDGETUNE_LABELS")
        return self

    def label_names(self) -> list[str]:
        if tuple(self.labels) == DEMO_LABELS and self.num_labels != len(DEMO_LABELS):
            return [f"label_{i}" for i in range(self.num_labels)]
        return list(self.labels)

    def classifier_task_fields(self) -> dict:
        """What a fleet must agree on, as TaskDefinition's fields (broker.messages): the base model's
        identity (models.fingerprint), the labels, pruning, LoRA (the target modules resolved: the model
        family's when none are set, so the task hash covers them), lengths, seed. Raises
        models.families.UnsupportedModel for a model of no supported family."""
        from models.classifier import model_name, resolve_model, resolved_targets, spec_family
        from models.fingerprint import model_hash

        spec = self.classifier_spec()
        path = resolve_model(spec.model)
        targets = resolved_targets(spec, spec_family(spec))
        return dict(mode="federated", model=model_name(spec.model), model_hash=model_hash(path), labels=self.label_names(),
                    max_length=spec.max_length, num_layers=spec.num_layers, lora_r=spec.lora_r,
                    lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                    target_modules=list(targets), seed=spec.seed)

    def classifier_spec(self) -> ClassifierSpec:
        return ClassifierSpec(
            model=self.model,
            num_labels=self.num_labels,
            num_layers=self.num_layers,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            max_length=self.max_length,
            seed=self.model_seed,
        )


class DecoderSettings(LoraSettings):
    """Split mode: the decoder, where it is cut, and the sequences it trains on."""

    split_model: str = Field("gpt2-config", description="gpt2-config (GPT-2 architecture, random init), "
                             "smollm2, or a local folder / hub name of a GPT-2 or Llama-family checkpoint")
    split_cut: int = Field(3, ge=1, description="decoder blocks on the edge")
    split_n_layer: int = Field(12, ge=2, description="gpt2-config: blocks")
    split_n_embd: int = Field(768, ge=8, description="gpt2-config: hidden size")
    split_n_head: int = Field(12, ge=1, description="gpt2-config: attention heads")
    seq_len: int = Field(128, ge=8, le=4096, description="tokens per training sequence")
    split_seed: int = 0

    def decoder_task_fields(self) -> dict:
        """TaskDefinition's fields in split mode (see ModelSettings.classifier_task_fields)."""
        from models.fingerprint import config_hash, model_hash

        config = {}
        if self.split_model == "gpt2-config":
            config = {"n_layer": self.split_n_layer, "n_embd": self.split_n_embd, "n_head": self.split_n_head}
            ident = config_hash(config, self.split_seed)
        elif self.split_model == "smollm2":  # the shipped GGUF file, whichever process converted it (models/smollm2.py)
            from models.smollm2 import smollm2_gguf

            ident = model_hash(smollm2_gguf())
        else:
            ident = model_hash(self.split_model)
        return dict(mode="split", model=Path(self.split_model).name, model_hash=ident, max_length=self.seq_len,
                    lora_r=self.lora_r, lora_alpha=self.lora_alpha, cut=self.split_cut, config=config,
                    seed=self.split_seed)

    def decoder_spec(self):
        from models.split import DecoderSpec

        return DecoderSpec(model=self.split_model, cut=self.split_cut, n_layer=self.split_n_layer,
                           n_embd=self.split_n_embd, n_head=self.split_n_head,
                           n_positions=max(1024, self.seq_len), lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                           seed=self.split_seed)


def task_fields(settings) -> dict:
    """TaskDefinition's fields for a side's settings (mode "split": the decoder's, else the classifier's).
    Raises models.fingerprint.ModelNotFound when the model's files are not on this machine."""
    return settings.decoder_task_fields() if settings.mode == "split" else settings.classifier_task_fields()
