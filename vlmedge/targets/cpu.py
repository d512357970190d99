"""The `cpu` target: ONNX Runtime's CPU execution provider on an export folder (the runner's timing path, with real
preprocessed images and captions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..runtime.measure import MeasureConfig, cpu_info


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), **_: Any) -> dict[str, Any]:
    from .. import families
    from .runner import run_ort

    folder = Path(path)
    family = families.of(folder)
    inputs = family.latency_inputs(family.adapter(folder, open_sessions=False), cfg.throughput_batch)
    # threads: cfg.threads, else each tower's count tuned on this CPU (manifest), else ONNX Runtime's default
    result = run_ort(folder, cfg, providers=["CPUExecutionProvider"], tune=False, inputs=inputs)
    return {"target": "cpu", "device": cpu_info()[0], **result}
