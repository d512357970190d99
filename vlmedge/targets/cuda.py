"""The `cuda` target: an export folder on the GPU through ONNX Runtime's CUDA execution provider.

Needs `onnxruntime-gpu` (`pip install vlmedge[gpu]`). For PyTorch on the GPU (fp16, timed with CUDA events) use
the `torch` target with options `{device: cuda, dtype: fp16}`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import families
from ..errors import VlmedgeError
from ..runtime.measure import MeasureConfig


def gpu_name() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), **_: Any) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise VlmedgeError("cuda target: this onnxruntime has no CUDAExecutionProvider; pip install vlmedge[gpu] "
                           "(onnxruntime-gpu), or use the torch target with {device: cuda}")
    result = families.of(path).onnx_latency(Path(path), cfg, ["CUDAExecutionProvider"])
    if result["providers"][0] != "CUDAExecutionProvider":
        raise VlmedgeError(f"cuda target: ONNX Runtime fell back to {result['providers']}; is a GPU visible?")
    result.update({"target": "cuda", "device": gpu_name() or "CUDA GPU"})
    return result
