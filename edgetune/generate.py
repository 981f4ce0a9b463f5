"""`edgetune generate`: sample text from a split-mode checkpoint.

The aggregator in split mode writes `<output_dir>/checkpoints/round-NNNN/` with the UNSPLIT
model's adapter in peft format (adapter_config.json + adapter_model.safetensors, whose
`base_model_name_or_path` is `../../base_model`, relative to the round folder), next to
split_head/split_tail safetensors; `aggregator.checkpoint` finds the round and its base.
Inference needs no split: the base model is loaded whole, the adapter put on it with peft, and
`model.generate` samples (with its KV cache: nothing crosses the wire here).

Register it on the main app with one line in edgetune/cli.py:

    from edgetune.generate import generate_cmd; app.command("generate")(generate_cmd)

This module imports only typer at import time; torch, transformers and peft load when it runs.
"""

from __future__ import annotations

from pathlib import Path

import typer


def load_checkpoint_model(checkpoint_dir: str | Path):
    """(model, tokenizer): the base causal LM with the checkpoint's adapter, in eval mode, on CPU."""
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aggregator.checkpoint import base_model_dir, resolve_checkpoint

    transformers.logging.set_verbosity_error()
    ck = resolve_checkpoint(checkpoint_dir)
    base_dir = base_model_dir(ck)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ck)).eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def prompt_ids(tokenizer, prompt: str):
    """(1, T) ids of the prompt; an empty prompt starts from the EOS (GPT-2's <|endoftext|>) token."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.empty(1, 0, dtype=torch.long)
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]], dtype=torch.long)
    return ids


def generate_ids(model, tokenizer, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8,
                 top_k: int = 50, seed: int = 0):
    """The new token ids (1-D tensor) after the prompt. temperature 0: greedy; top_k 0: no top-k."""
    import torch

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0: greedy)")
    ids = prompt_ids(tokenizer, prompt)
    kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=int(top_k) if top_k else None, top_p=None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # seeded here, the caller's RNG left as it was
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, **kwargs)
    return out[0, ids.shape[1]:]


def generate(checkpoint_dir: str | Path, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """The continuation of `prompt` (the new text only, without the prompt) sampled from a split checkpoint.

    `checkpoint_dir` is a round folder (`<output_dir>/checkpoints/round-NNNN`), or the output
    folder / its checkpoints folder (then the latest round). temperature 0 decodes greedily;
    otherwise tokens are sampled at that temperature from the top_k most likely (0: all), with
    torch seeded by `seed`, so a fixed seed gives the same text every time.
    """
    model, tok = load_checkpoint_model(checkpoint_dir)
    new = generate_ids(model, tok, prompt, max_new_tokens, temperature, top_k, seed)
    return tok.decode(new, skip_special_tokens=True)


def generate_cmd(
    checkpoint: Path = typer.Argument(..., help="a split checkpoint folder (…/checkpoints/round-0005), or an "
                                                "aggregator output folder (its latest round)"),
    prompt: str = typer.Option("The", "--prompt", "-p", help="text to continue"),
    max_new_tokens: int = typer.Option(40, min=1, help="tokens to generate"),
    temperature: float = typer.Option(0.8, min=0.0, help="sampling temperature (0: greedy)"),
    top_k: int = typer.Option(50, min=0, help="sample from the k most likely tokens (0: all)"),
    seed: int = typer.Option(0, help="random seed: the same seed gives the same text"),
) -> None:
    """Generate text from a split-mode checkpoint (base model + the trained adapter, via peft)."""
    import transformers

    transformers.logging.disable_progress_bar()  # no "Loading weights" bar around the text
    try:
        text = generate(checkpoint, prompt, max_new_tokens, temperature, top_k, seed)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(prompt + text)
