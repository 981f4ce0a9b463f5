"""Logging set-up for every CLI: one line format, quiet paho and transformers."""

import logging
import os
import sys
import warnings


def setup_logging(level: str = "INFO", name: str = "") -> None:
    fmt = f"%(asctime)s %(levelname).1s {name + ' ' if name else ''}%(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("paho").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
