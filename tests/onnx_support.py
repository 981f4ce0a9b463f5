"""A small exported model in an agent's state dir, as the agent leaves it: for the tests of the
device commands (tests/test_agent_cli.py, tests/test_serve_install.py).

Needs torch (the export); what it writes is read with ONNX Runtime alone.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.local_settings import CURRENT_FILE, MODELS_DIR

SERVED_LABELS = ("negative", "positive")


def export_served_model(state_dir: Path, name: str = "g00003-l0000-1", max_length: int = 32) -> Path:
    """The shipped MiniLM classifier (untrained LoRA, a random head so that it does not answer one
    class for everything) exported to int8 ONNX in `state_dir/models/<name>` and made the model the
    agent serves (models/CURRENT). Returns the model folder. About 10 s on 2 cores."""
    import torch

    from models.classifier import ClassifierSpec, build_classifier, load_tokenizer
    from models.onnx_export import export_onnx
    from models.onnx_int8 import quantize_int8

    spec = ClassifierSpec(max_length=max_length)
    model, tok = build_classifier(spec), load_tokenizer(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "classifier" in pname and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    d = Path(state_dir) / MODELS_DIR / name
    quantize_int8(export_onnx(model, tok, d, max_length=max_length, adapter_version=3, labels=SERVED_LABELS))
    (Path(state_dir) / MODELS_DIR / CURRENT_FILE).write_text(d.name + "\n")
    return d
