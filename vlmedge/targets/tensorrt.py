"""The `tensorrt` target: build an engine per tower from the ONNX files and time it with trtexec.

The command comes from `runtime/trtexec.py` (shared with the board runner): the precision follows the export, with
the flags each TensorRT version needs (none on 11, `--stronglyTyped` on 9.1-10, `--fp16`/`--int8` on 8.x).
Engines do not move between TensorRT versions or GPUs: each result records both, and engines are cached per
(version, GPU) next to the export.

Verified here: the command construction and the parsing of real trtexec output (tests/fixtures/trtexec).
Not verified: an actual engine build and run; no TensorRT was available to this work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import VlmedgeError
from ..runtime.measure import MeasureConfig
from ..runtime.onnx import read_manifest
from ..runtime.parsers import parse_trtexec
from ..runtime.trtexec import PrecisionError, build_command, fixed_shapes, version_of
from .cuda import gpu_name

DEFAULT_TRTEXEC = ("trtexec", "/usr/src/tensorrt/bin/trtexec")


def find_trtexec(explicit: str | None = None) -> str:
    for candidate in ([explicit] if explicit else DEFAULT_TRTEXEC):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    raise VlmedgeError("tensorrt target: trtexec not found (install TensorRT, or pass {trtexec: /path/to/trtexec}; "
                       "pip install vlmedge[tensorrt] gives the Python API, not trtexec)")


def trtexec_version(trtexec: str) -> tuple[int, int]:
    version = version_of(trtexec)
    if not version:
        raise VlmedgeError(f"tensorrt target: cannot tell the TensorRT version of {trtexec}")
    return version


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), trtexec: str | None = None,
              **_: Any) -> dict[str, Any]:
    folder = Path(path)
    manifest = read_manifest(folder)
    exe = find_trtexec(trtexec)
    version = trtexec_version(exe)
    gpu = gpu_name() or "unknown GPU"
    cache = folder / "engines" / re.sub(r"[^\w.-]+", "_", f"trt{version[0]}.{version[1]}-{gpu}")
    cache.mkdir(parents=True, exist_ok=True)
    towers = {}
    for tower in manifest["files"]:
        try:
            cmd = build_command(exe, folder / manifest["files"][tower], fixed_shapes(manifest, tower), version,
                                manifest.get("precision", "fp32"), warmup=cfg.warmup, min_runs=cfg.min_runs,
                                min_seconds=cfg.min_seconds, engine=cache / f"{tower}.plan",
                                times=cache / f"{tower}.times.json")
        except PrecisionError as e:
            raise VlmedgeError(f"tensorrt target: {e}") from None
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise VlmedgeError(f"tensorrt target: trtexec failed on {tower} ({p.stdout[-300:]}{p.stderr[-300:]})")
        towers[tower] = parse_trtexec(p.stdout)
    pair = {k: towers["image"]["latency"][k] + towers["text"]["latency"][k]
            for k in ("p50_ms", "mean_ms") if k in towers["image"]["latency"] and k in towers["text"]["latency"]}
    return {"target": "tensorrt", "device": gpu, "runtime": f"TensorRT {version[0]}.{version[1]} (trtexec)",
            "precision": manifest.get("precision", "fp32"), "batch": 1, "threads": None,
            "image": towers["image"]["latency"], "text": towers["text"]["latency"],
            "pair_estimate": {**pair, "note": "sum of the towers' medians and means"},
            "trtexec": {t: {k: v for k, v in r.items() if k != "warnings"} for t, r in towers.items()},
            "engines": str(cache), "command": json.dumps(cmd)}
