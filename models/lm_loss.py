"""The causal LM loss of the split step, per agent request: pure torch, no model loading.

The split server (aggregator/split_server.py), the agents' split trainer and the evaluation use
these, so that a group of rows served in one micro-batch gets exactly the loss it would alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss_per_sequence_group(logits: torch.Tensor, labels: torch.Tensor, groups: list[slice]) -> list[torch.Tensor]:
    """Mean next-token cross-entropy of each group of rows (one group per agent request).

    logits (B, T, V), labels (B, T) with -100 where no loss; the shift is done here, as in
    transformers' causal LM loss, so a group alone gives exactly the model's own loss. The
    token losses are computed once for the whole batch and then summed per group.
    """
    B, T, V = logits.shape
    shift_labels = labels[:, 1:]  # (B, T-1)
    tok = F.cross_entropy(logits[:, :-1, :].reshape(-1, V).float(), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(B, T - 1)
    valid = (shift_labels != -100)
    losses = []
    for g in groups:
        losses.append(tok[g].sum() / valid[g].sum().clamp_min(1))
    return losses


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(attention_mask == 0, -100)
