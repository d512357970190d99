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

from ..errors import VlmedgeError

TARGETS = {"cpu": "cpu", "torch": "torch_", "cuda": "cuda", "tensorrt": "tensorrt", "jetson": "jetson"}
TARGET_KINDS = {"cpu": "onnx", "torch": "model", "cuda": "onnx", "tensorrt": "onnx", "jetson": "onnx"}
"""Which artifacts a target can run: export folders (onnx) or model folders (model)."""


def get_target(name: str) -> Callable[..., dict[str, Any]]:
    if name not in TARGETS:
        raise VlmedgeError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    return importlib.import_module(f".{TARGETS[name]}", __name__).benchmark


def artifact_kind(path: Path) -> str:
    """'onnx' for an export folder, 'model' for a model folder."""
    if (path / "manifest.json").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "model"
    raise VlmedgeError(f"{path}: neither an export folder (manifest.json) nor a model folder (config.json)")
