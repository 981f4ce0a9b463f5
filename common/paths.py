"""Where EdgeTune keeps what it makes once per machine and reuses (no settings object: plain paths).

    cache_dir()        $EDGETUNE_CACHE_DIR, else $XDG_CACHE_HOME/edgetune, else ~/.cache/edgetune
    model_cache_dir()  $EDGETUNE_MODEL_CACHE, else cache_dir()/models: shipped models converted to a
                       plain transformers folder (models/smollm2.py)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("EDGETUNE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetune"


def model_cache_dir() -> Path:
    env = os.environ.get("EDGETUNE_MODEL_CACHE")
    return Path(env) if env else cache_dir() / "models"
