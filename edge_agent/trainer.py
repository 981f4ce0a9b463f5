"""The agent's trainer: holds the model, loads globals, trains locally, hands out its update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from models.classifier import ClassifierSpec, adapter_state, build_classifier, load_adapter_state, load_tokenizer
from models.train import TrainResult, anchored_proximal, train_local, trainable_parameters


@dataclass
class LocalUpdate:
    tensors: dict[str, torch.Tensor]
    num_examples: int
    result: TrainResult


class Trainer:
    def __init__(self, spec: ClassifierSpec, *, lr: float = 1e-3, batch_size: int = 32, prox_mu: float = 0.0,
                 seed: int = 0) -> None:
        self.spec = spec
        self.model = build_classifier(spec)
        self.model.eval()
        self.tokenizer = load_tokenizer(spec)
        self.lr, self.batch_size, self.prox_mu, self.seed = lr, batch_size, prox_mu, seed
        self.global_version = -1

    def load_global(self, state: dict[str, torch.Tensor], version: int) -> None:
        load_adapter_state(self.model, state)  # raises AdapterMismatch on a wrong adapter
        self.global_version = version

    def state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def _proximal(self) -> Callable[[], torch.Tensor] | None:
        """FedProx: mu/2 ||w - w_global||^2 around the adapter as it is now (the loaded global)."""
        return anchored_proximal(trainable_parameters(self.model), self.prox_mu) if self.prox_mu else None

    def train(self, examples: Sequence, *, epochs: int, max_steps: int, round_number: int,
              should_stop: Callable[[], bool] | None = None, lr: float | None = None,
              batch_size: int | None = None, proximal: bool = True,
              on_step: Callable[[int, int], None] | None = None) -> LocalUpdate:
        """Train on `examples` from the model's current state; lr/batch_size override the trainer's.

        `proximal=False` leaves out the FedProx term (incremental learning between rounds).
        """
        result = train_local(
            self.model, self.tokenizer, examples, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size or self.batch_size, lr=lr or self.lr, max_length=self.spec.max_length,
            seed=self.seed * 100_003 + round_number, proximal=self._proximal() if proximal else None,
            should_stop=should_stop, on_step=on_step,
        )
        return LocalUpdate(self.state(), min(result.examples_seen, len(examples)), result)
