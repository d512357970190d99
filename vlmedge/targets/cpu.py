"""The `cpu` target: ONNX Runtime's CPU execution provider on an export folder (the runner's timing path, with real
preprocessed images and captions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..runtime.measure import MeasureConfig, cpu_info
from . import sample_inputs


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), **_: Any) -> dict[str, Any]:
    from ..runtime.onnx import OnnxEncoder
    from .runner import run_ort

    folder = Path(path)
    enc = OnnxEncoder(folder, open_sessions=False)  # preprocessing and tokenizer only
    inputs = sample_inputs(enc.preprocess, enc.tokenize, cfg.throughput_batch)
    # threads: cfg.threads, else each tower's count tuned on this CPU (manifest), else ONNX Runtime's default
    result = run_ort(folder, cfg, providers=["CPUExecutionProvider"], tune=False, inputs=inputs)
    return {"target": "cpu", "device": cpu_info()[0], **result}
