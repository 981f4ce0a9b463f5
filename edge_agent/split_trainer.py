"""The agent's side of split learning: head forward, activations out, gradient in, backward.

`request(step, header_fields, tensors) -> (SplitGradient, tensors)` is handed in by the runner
(it owns the transport); this class never touches MQTT.

The head is the model's own transformers modules with peft LoRA (`head="transformers"`), or, for
GPT-2, the lean head of models.lean_gpt2 (`head="lean"`: torch + loralib, so this process never
imports transformers or peft). Both speak the same peft adapter names, so their updates average.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from broker import activations
from edge_agent.trainer import LocalUpdate
from models.classifier import adapter_state, check_adapter_state, load_adapter_state
from models.split import (DecoderSpec, add_split_lora, causal_lm_labels, load_full_model, load_tokenizer, lora_seed,
                          lora_targets, split_model)
from models.train import TrainResult, planned_steps

RequestFn = Callable[..., tuple]  # (step, encoding, tensors, evaluate=False) -> (SplitGradient, tensors)


class SplitTrainer:
    def __init__(self, spec: DecoderSpec, request: RequestFn, *, lr: float = 1e-3, batch_size: int = 8,
                 encoding: str = "fp32", seed: int = 0, head: Literal["transformers", "lean"] = "transformers",
                 head_path: str | None = None) -> None:
        if head == "lean":
            self.model, self.tokenizer = _lean_head(spec, head_path)
        elif head == "transformers":
            full = load_full_model(spec)
            targets = lora_targets(full)
            h, _ = split_model(full, spec.cut)
            del full
            self.model = add_split_lora(h, targets, spec, "head")  # the same head LoRA init as the aggregator's
            self.tokenizer = load_tokenizer(spec)
        else:
            raise ValueError(f"split head {head!r}: use transformers or lean")
        self.head = head
        self.spec = spec
        self.request = request
        self.lr, self.batch_size, self.encoding, self.seed = lr, batch_size, encoding, seed
        self.global_version = -1
        self.step = 0  # this agent's split step counter: the request id the server caches by
        self.eval_step = 0  # its evaluation requests' own counter (they are never cached)
        self.last_server_loss: float | None = None

    def load_global(self, state: dict[str, torch.Tensor], version: int) -> None:
        if self.head == "lean":
            check_adapter_state(self.state(), state)
            self.model.load_adapter_state(state)
        else:
            load_adapter_state(self.model, state)
        self.global_version = version

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.adapter_state() if self.head == "lean" else adapter_state(self.model)

    def split_step(self, ids: torch.Tensor, opt: torch.optim.Optimizer) -> float:
        """One step: (B, T) token ids -> head -> server -> gradient -> head update. Returns the loss."""
        mask = torch.ones_like(ids)
        labels = causal_lm_labels(ids, mask)
        act = self.model(ids, mask)  # (B, T, C) activation at the cut
        tensors = activations.encode(act, self.encoding, "act")
        tensors["attention_mask"] = mask.to(torch.int8)
        tensors["labels"] = labels
        reply, rt = self.request(self.step, self.encoding, tensors)
        grad = activations.decode(rt, reply.encoding, "grad")
        if grad.shape != act.shape:
            raise ValueError(f"server gradient shape {tuple(grad.shape)} != activation {tuple(act.shape)}")
        opt.zero_grad(set_to_none=True)
        act.backward(grad)
        opt.step()
        self.step += 1
        return reply.loss

    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor) -> tuple[float, int]:
        """Federated evaluation of the head and the server's tail as they are: (mean next-token loss,
        tokens) over these (N, T) blocks, through evaluation requests (no backward, no step)."""
        self.model.eval()
        total, tokens = 0.0, 0
        for i in range(0, len(blocks), self.batch_size):
            ids = blocks[i : i + self.batch_size]
            mask = torch.ones_like(ids)
            tensors = activations.encode(self.model(ids, mask), self.encoding, "act")
            tensors["attention_mask"] = mask.to(torch.int8)
            tensors["labels"] = causal_lm_labels(ids, mask)
            reply, _ = self.request(self.eval_step, self.encoding, tensors, evaluate=True)
            self.eval_step += 1
            total += reply.loss * reply.tokens
            tokens += reply.tokens
        return total / max(tokens, 1), tokens

    def train(self, blocks: torch.Tensor, *, epochs: int, max_steps: int, round_number: int,
              should_stop: Callable[[], bool] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> LocalUpdate:
        """Split steps over this agent's (N, T) token blocks, at most `max_steps`; `on_step(done, planned)`
        hears of every step (the agent's status shows it)."""
        self.model.train()
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        g = torch.Generator().manual_seed(self.seed * 100_003 + round_number)
        steps = seen = 0
        total = 0.0
        t0 = time.perf_counter()
        done = False
        planned = planned_steps(len(blocks), self.batch_size, epochs, max_steps)
        for _ in range(epochs):
            order = torch.randperm(len(blocks), generator=g)
            for i in range(0, len(order), self.batch_size):
                ids = blocks[order[i : i + self.batch_size]]
                total += self.split_step(ids, opt)
                steps += 1
                seen += len(ids)
                if on_step is not None:
                    on_step(steps, planned)
                if (max_steps and steps >= max_steps) or (should_stop and should_stop()):
                    done = True
                    break
            if done:
                break
        self.model.eval()
        return LocalUpdate(self.state(), max(min(seen, len(blocks)), 1),
                           TrainResult(steps, seen, total / max(steps, 1), time.perf_counter() - t0))


def _lean_head(spec: DecoderSpec, head_path: str | None):
    """(lean GPT-2 head, tokenizer) without transformers: weights from head_path or the split_model folder."""
    from models.lean_gpt2 import check_export_matches, lean_tokenizer, load_lean_head

    is_folder = spec.model not in ("gpt2-config", "smollm2") and Path(spec.model).is_dir()
    if spec.model != "gpt2-config" and not is_folder:
        raise ValueError(f"the lean head loads GPT-2 from a local folder; split_model {spec.model!r} is not one: "
                         "use EDGETUNE_SPLIT_HEAD=transformers")
    folder = head_path or (spec.model if is_folder else None)
    if folder is None:
        raise ValueError("the lean head needs the head's weights for gpt2-config: run `python -m models.lean_gpt2 "
                         "export DIR` with this fleet's split settings (on any machine with transformers) and set "
                         "EDGETUNE_SPLIT_HEAD_PATH=DIR")
    check_export_matches(folder, spec)
    model = load_lean_head(folder, cut=spec.cut, lora_r=spec.lora_r, lora_alpha=spec.lora_alpha,
                           lora_seed=lora_seed(spec, "head"))
    return model, lean_tokenizer(spec.model if is_folder else None)
