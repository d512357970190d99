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
from .measure import MeasureConfig, peak_rss_mb, time_fn

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


def suite(image: Callable[[int], Callable[[], Any]], text: Callable[[int], Callable[[], Any]],
          zero_shot: Callable[[], Any], cfg: MeasureConfig, record: dict[str, Any],
          timer=None, sync=None) -> dict[str, Any]:
    """Batch-1 latency of image, text, pair (image then text) and zero-shot; batched image throughput.

    `image(b)` / `text(b)` return a zero-argument callable that runs one batch of size b.
    """
    img1, txt1 = image(1), text(1)

    def pair():
        img1()
        txt1()

    result = dict(record)
    result.update({"batch": 1, "measure": {k: getattr(cfg, k) for k in ("warmup", "min_runs", "min_seconds")}})
    for name, fn in (("image", img1), ("text", txt1), ("pair", pair), ("zero_shot", zero_shot)):
        result[name] = time_fn(fn, cfg, sync=sync, timer=timer)
    b = cfg.throughput_batch
    batched = time_fn(image(b), MeasureConfig(warmup=2, min_runs=10, min_seconds=0.5), sync=sync, timer=timer)
    result["throughput"] = {"batch": b, "images_per_s": b / (batched["p50_ms"] / 1e3), "p50_ms": batched["p50_ms"]}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def artifact_kind(path: Path) -> str:
    """'onnx' for an export folder, 'model' for a model folder."""
    if (path / "manifest.json").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "model"
    raise VlmedgeError(f"{path}: neither an export folder (manifest.json) nor a model folder (config.json)")
