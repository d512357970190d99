"""Hugging Face libraries, quietly and offline."""

from __future__ import annotations

import os


def quiet_transformers() -> None:
    """No network, no per-load progress bars or info logs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
