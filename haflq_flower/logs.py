"""Progress output: our INFO lines next to Flower's, in the ServerApp and the ClientApps."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging() -> None:
    """Send the ``haflq_flower`` logger to stderr once per process (level: $HAFLQ_LOG_LEVEL)."""
    logger = logging.getLogger("haflq_flower")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s haflq %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("HAFLQ_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
    # transformers/bnb chatter (load reports, offline-kernel notices) hides our progress.
    for noisy in ("transformers", "bitsandbytes", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # transformers draws a "Loading weights" bar per model load: noise in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
