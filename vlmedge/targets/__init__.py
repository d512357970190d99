"""Where latency is measured. One module per target, chosen by name; all share `measure.py`'s method.

* ``cpu``   ONNX Runtime CPU execution provider on export folders (the artifacts the stages ship);
* ``torch`` the PyTorch model, eager (CPU, or CUDA with ``device: cuda``): the baseline for every speedup;
* ``cuda``  ONNX Runtime's CUDA execution provider on export folders (onnxruntime-gpu);
* ``tensorrt`` engines built and timed by trtexec (precision from the export, per TensorRT version);
* ``jetson`` a remote board over SSH: a bundle with a small runner is copied, run and read back.

A target is a function ``(path, MeasureConfig, **options) -> result dict`` (see `suite`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import VlmedgeError

TARGETS = {"cpu": "cpu", "torch": "torch_", "cuda": "cuda", "tensorrt": "tensorrt", "jetson": "jetson"}
TARGET_KINDS = {"cpu": "onnx", "torch": "model", "cuda": "onnx", "tensorrt": "onnx", "jetson": "onnx"}
"""Which artifacts a target can run: export folders (onnx) or model folders (model)."""


def get_target(name: str) -> Callable[..., dict[str, Any]]:
    if name not in TARGETS:
        raise VlmedgeError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    return importlib.import_module(f".{TARGETS[name]}", __name__).benchmark


def sample_inputs(preprocess, tokenize, batch: int, seed: int = 0):
    """A deterministic synthetic image batch and caption batch, preprocessed and tokenised as in deployment."""
    from ..data.shapes import load_shapes

    data = load_shapes("val", max(batch, 16), preprocess.image_size, seed=seed)
    pixels = preprocess(data.images[:batch])
    rng = np.random.default_rng(seed)
    tokens = tokenize(data.captions(range(batch), rng))
    return pixels, {k: np.asarray(v, dtype=np.int64) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def artifact_kind(path: Path) -> str:
    """'onnx' for an export folder, 'model' for a model folder."""
    if (path / "manifest.json").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "model"
    raise VlmedgeError(f"{path}: neither an export folder (manifest.json) nor a model folder (config.json)")
