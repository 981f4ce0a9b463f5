"""Settings that define the model; every agent and the aggregator of a fleet must agree."""

from __future__ import annotations

from pydantic import BaseModel, Field

from models.classifier import ClassifierSpec


class ModelSettings(BaseModel):
    model: str | None = Field(None, description="local model folder or hub name; unset: the shipped MiniLM")
    num_layers: int = Field(4, ge=0, le=48, description="encoder layers kept on the edge (0: all)")
    num_labels: int = Field(2, ge=2)
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1)
    max_length: int = Field(64, ge=8, le=512)
    model_seed: int = Field(0, description="seed of the new classifier head (same on every process)")

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
