"""The `cpu` target: ONNX Runtime's CPU execution provider on an export folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import sample_inputs
from .measure import MeasureConfig, cpu_info, suite, thread_record


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), **_: Any) -> dict[str, Any]:
    from ..stages.export import OnnxEncoder

    enc = OnnxEncoder(Path(path), threads=cfg.threads)  # None: each tower's tuned count (manifest), else ORT's
    pixels, tokens = sample_inputs(enc.preprocess, enc.tokenize, cfg.throughput_batch)
    text_embeds = enc.encode_texts(["a red circle", "a blue square", "a green triangle"] * 12)  # 36 classes

    def image(b):
        return lambda: enc.run_image(pixels[:b])

    def text(b):
        return lambda: enc.run_text(tokens["input_ids"][:b], tokens["attention_mask"][:b])

    def zero_shot():
        return int(np.argmax(enc.run_image(pixels[:1]) @ text_embeds.T))

    import onnxruntime

    record = {"target": "cpu", "device": cpu_info()[0], **thread_record(enc.threads),
              "runtime": f"onnxruntime {onnxruntime.__version__}", "precision": enc.manifest.get("precision", "fp32")}
    return suite(image, text, zero_shot, cfg, record)
