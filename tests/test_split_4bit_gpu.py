"""The split server's tail on CUDA with a 4-bit (NF4, bitsandbytes) base under LoRA (QLoRA).

A small GPT-2 (4 blocks, width 256, the full vocabulary) is saved, its tail reloaded in 4 bits
(models.split.load_4bit) and served by the real SplitServer. Checked: the tail's block weights
are bitsandbytes 4-bit layers and take under a third of their float32 bytes; its first loss is
within 5% of the float32 tail's on the same activations (random init: about ln 50257 = 10.8);
20 server steps on a fixed batch bring the loss down by at least 20%; the gradient sent back
is finite and float32 on the host; and its adapter has the float32 tail's names and shapes, so
checkpoints and the unsplit peft adapter work as in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from aggregator.split_server import SplitRequest, SplitServer
from models.classifier import adapter_state
from models.split import DecoderSpec, add_lora, causal_lm_labels, load_4bit, load_full_model, split_model

pytestmark = pytest.mark.gpu


def _bytes(module, blocks) -> int:
    return sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())


def test_4bit_tail_trains_and_keeps_the_adapter_layout(tmp_path):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU (run it with -m gpu on a GPU machine)"
    try:
        import bitsandbytes as bnb
    except ImportError:
        pytest.fail("bitsandbytes is missing: pip install -e '.[gpu]'")
    spec = DecoderSpec(n_layer=4, n_embd=256, n_head=4, cut=2)
    full = load_full_model(spec)
    full.save_pretrained(tmp_path / "base")
    head, tail32 = split_model(full, spec.cut)
    _, tail4 = split_model(load_4bit(tmp_path / "base", "cuda"), spec.cut)

    blocks4 = tail4.lm.transformer.h
    assert isinstance(blocks4[0].attn.c_attn, bnb.nn.Linear4bit), type(blocks4[0].attn.c_attn)
    assert _bytes(tail4, blocks4) < _bytes(tail32, tail32.lm.transformer.h) / 3

    torch.manual_seed(2)
    tail32 = add_lora(tail32, ["c_attn"])
    torch.manual_seed(2)
    tail4 = add_lora(tail4, ["c_attn"])
    s32, s4 = adapter_state(tail32), adapter_state(tail4)
    assert {k: tuple(v.shape) for k, v in s32.items()} == {k: tuple(v.shape) for k, v in s4.items()}

    g = torch.Generator().manual_seed(0)
    reqs = []
    with torch.no_grad():
        for i in range(4):
            ids = torch.randint(0, 50257, (4, 64), generator=g)
            mask = torch.ones_like(ids)
            reqs.append(SplitRequest(f"a{i}", 0, head(ids, mask), mask, causal_lm_labels(ids, mask)))
    first32 = SplitServer(copy.deepcopy(tail32), lr=0.0, device="cuda").serve(reqs)
    server = SplitServer(tail4, lr=1e-2, device="cuda")
    losses = []
    for step in range(20):
        replies = server.serve([SplitRequest(r.agent_id, step, r.act, r.attention_mask, r.labels) for r in reqs])
        losses.append(sum(r.loss for r in replies) / len(replies))
        for r in replies:
            assert r.grad.dtype == torch.float32 and r.grad.device.type == "cpu"
            assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0
    base32 = sum(r.loss for r in first32) / len(first32)
    assert abs(losses[0] - base32) <= 0.05 * base32, f"4-bit first loss {losses[0]:.3f} vs float32 {base32:.3f}"
    assert losses[-1] <= 0.8 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 20 steps"
    assert any(not torch.equal(adapter_state(server.tail)[k].cpu(), s4[k].cpu()) for k in s4)
