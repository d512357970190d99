"""The `cpu` target: ONNX Runtime's CPU execution provider on an export folder (the family's latency scenarios, with
real preprocessed inputs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import families
from ..runtime.measure import MeasureConfig, cpu_info


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), **_: Any) -> dict[str, Any]:
    folder = Path(path)
    result = families.of(folder).onnx_latency(folder, cfg, ["CPUExecutionProvider"])
    return {"target": "cpu", "device": cpu_info()[0], **result}
