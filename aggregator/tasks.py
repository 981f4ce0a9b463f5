"""What the aggregator trains and evaluates, per learning mode, behind one small interface.

The service (I/O) asks a task for the global adapter state, hands it an aggregated state,
asks it to evaluate and to checkpoint. `ClassifierTask` is the federated edge classifier;
`SplitLMTask` is split learning of a decoder, whose federated "global adapter" is the agents'
head adapter and whose tail lives here, trained by the split server.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aggregator.checkpoint import (latest_checkpoint, load_checkpoint_state, save_base, save_checkpoint,
                                   upgrade_output_dir)
from models.classifier import adapter_state, load_adapter_state


class ClassifierTask:
    """The federated classifier. Its central evaluation is optional: with EDGETUNE_EVAL_DATA (a
    file, folder or demo:NAME, labelled with the task's labels; a demo's held-out split) the
    aggregator evaluates every global itself; without it the fleet's evaluation is the agents'
    (federated evaluation, aggregator/evaluation.py) and the aggregator reads no data at all."""

    kind = "federated"

    def __init__(self, settings, out: Path) -> None:
        from models.classifier import build_classifier, load_tokenizer

        self.s = settings
        self.out = out
        spec = settings.classifier_spec()
        self.labels = settings.label_names()
        self.test = self._central_eval_data()
        self.model = build_classifier(spec).eval()
        self.tokenizer = load_tokenizer(spec)
        self.base_path = save_base(self.model, self.tokenizer, out, labels=self.labels)

    def _central_eval_data(self) -> list:
        """The central evaluation set (EDGETUNE_EVAL_DATA), [] without one. A bad file raises
        data.records.DataError before anything is built or published."""
        from data.sources import is_demo, load_source

        s = self.s
        if not s.eval_data:
            return []
        test = list(load_source(s.eval_data, labels=self.labels, split="test" if is_demo(s.eval_data) else None,
                                **s.load_options()).examples)
        if s.eval_limit and s.eval_limit < len(test):  # a fixed random subset, all domains
            test = random.Random(s.seed).sample(test, s.eval_limit)
        return test

    def global_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state)

    def evaluate(self) -> dict:
        """The central evaluation's figures ({} without central evaluation data)."""
        from aggregator.evaluation import classification_figures
        from models.train import evaluate

        if not self.test:
            return {}
        r = evaluate(self.model, self.tokenizer, self.test, batch_size=self.s.eval_batch_size, max_length=self.s.max_length)
        return {"eval": "central", **classification_figures(r.confusion, self.labels), "loss": r.loss}

    def checkpoint(self, round_number: int, version: int, extra: dict) -> Path:
        from aggregator.model_card import write_checkpoint_card

        path = save_checkpoint(self.model, self.out, round_number=round_number, version=version, extra=extra,
                               base_path=self.base_path)
        write_checkpoint_card(path, self.s, round_number, version, extra)  # README.md: aggregator.model_card
        return path

    def resume(self):
        """The latest checkpoint's global, loaded (None: none yet). A folder of the previous release
        is upgraded first (no absolute path; its base got the label names in __init__)."""
        upgrade_output_dir(self.out)
        ck = latest_checkpoint(self.out)
        if ck is not None:
            self.load_global(load_checkpoint_state(ck.path))
        return ck


class SplitLMTask:
    """Split learning: the edge head's adapter is federated; the tail is trained here."""

    kind = "split"

    def __init__(self, settings, out: Path) -> None:
        from aggregator.split_server import SplitServer
        from data.corpus import lm_split, token_blocks
        from models.split import (add_lora, add_split_lora, family_of, load_4bit, load_full_model, load_tokenizer,
                                  lora_targets, split_model)

        self.s = settings
        self.out = out
        self.spec = settings.decoder_spec()
        full = load_full_model(self.spec)
        self.family = family_of(full)
        self.tokenizer = load_tokenizer(self.spec)
        targets = lora_targets(full)
        # the unsplit base, saved once: checkpoints name it, and the 4-bit tail is loaded from it
        base_dir = out / "base_model"
        if not (base_dir / "config.json").exists():
            full.save_pretrained(base_dir)
            self.tokenizer.save_pretrained(base_dir)
        self.base_path = base_dir
        head, tail = split_model(full, self.spec.cut)
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if settings.split_quantize == "4bit":  # QLoRA: the tail's base weights in NF4 on the GPU
            _, tail = split_model(load_4bit(base_dir, device), self.spec.cut)
        self.head = add_split_lora(head, targets, self.spec, "head").eval()  # the agents' head LoRA init
        tail = add_split_lora(tail, targets, self.spec, "tail")
        self.server = SplitServer(tail, lr=settings.split_lr, max_tokens=settings.split_max_tokens, device=device)
        self.head.to(self.server.device)
        # the unsplit model with LoRA, used only to save checkpoints as one ordinary peft adapter
        self.whole = add_lora(full, targets, self.spec.lora_r, self.spec.lora_alpha)
        _, test = lm_split()
        self.test_blocks = token_blocks(self.tokenizer, test, settings.seq_len, max_blocks=settings.eval_sequences)

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in adapter_state(self.head).items()}

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.head, state)

    def tail_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in adapter_state(self.server.tail).items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        from models.split import causal_lm_labels, lm_loss_per_sequence_group

        dev = self.server.device
        self.server.tail.eval()
        total, tokens = 0.0, 0
        try:
            for i in range(0, len(self.test_blocks), 8):
                ids = self.test_blocks[i : i + 8].to(dev)
                mask = torch.ones_like(ids)
                logits = self.server.tail(self.head(ids, mask), mask)
                (loss,) = lm_loss_per_sequence_group(logits, causal_lm_labels(ids, mask), [slice(0, len(ids))])
                n = ids.numel() - len(ids)
                total += float(loss) * n
                tokens += n
        finally:
            self.server.tail.train()
        loss = total / max(tokens, 1)
        return {"eval": "central", "loss": loss, "perplexity": math.exp(min(loss, 50)), "eval_tokens": tokens, **self.rouge()}

    @torch.no_grad()
    def rouge(self) -> dict:
        """ROUGE-1/2/L of greedy continuations: the first eval_rouge_prompt_tokens of the first
        eval_rouge_prompts held-out sequences are the prompts, their next eval_rouge_new_tokens
        the references. Decoded through the split model itself (head, then tail; no KV cache)."""
        from aggregator.rouge import rouge

        s = self.s
        n, (p, g) = s.eval_rouge_prompts, s.rouge_lengths()
        if n == 0:
            return {}
        blocks = self.test_blocks[:n].to(self.server.device)  # [n, seq_len]
        ids, refs = blocks[:, :p], blocks[:, p:p + g]
        self.server.tail.eval()
        try:
            for _ in range(g):
                mask = torch.ones_like(ids)
                logits = self.server.tail(self.head(ids, mask), mask)  # [n, T, vocab]
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        finally:
            self.server.tail.train()
        hyps = [self.tokenizer.decode(row[p:].tolist()) for row in ids.cpu()]
        references = [self.tokenizer.decode(row.tolist()) for row in refs.cpu()]
        return {**rouge(references, hyps), "rouge_samples": len(hyps), "sample_prompt": self.tokenizer.decode(
            blocks[0, :p].tolist()), "sample_generation": hyps[0]}

    def checkpoint(self, round_number: int, version: int, extra: dict) -> Path:
        from models.split import full_adapter_state

        full = full_adapter_state(self.global_state(), self.tail_state(), self.family, self.spec.cut)
        load_adapter_state(self.whole, full)
        path = save_checkpoint(self.whole, self.out, round_number=round_number, version=version, extra=extra,
                               base_path=self.base_path)
        save_file(self.global_state(), str(path / "split_head.safetensors"))
        save_file(self.tail_state(), str(path / "split_tail.safetensors"))
        return path

    def resume(self):
        upgrade_output_dir(self.out)  # a folder of the previous release: no absolute path
        ck = latest_checkpoint(self.out)
        if ck is not None:
            self.load_global(load_file(str(ck.path / "split_head.safetensors")))
            load_adapter_state(self.server.tail, load_file(str(ck.path / "split_tail.safetensors")))
        return ck


def make_task(settings, out: Path):
    if settings.mode == "split":
        return SplitLMTask(settings, out)
    return ClassifierTask(settings, out)
