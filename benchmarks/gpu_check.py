"""The generative family on a CUDA GPU, as one JSON (`benchmarks/gpu_check.sh` runs it after the `gpu` tests).

Two models: the vqa-small teacher (trained here, briefly: latency does not depend on how well) and a
SmolVLM-256M-shaped folder at full depth (published sizes, random weights). Each is timed with the `torch` target on
CUDA in fp16 and fp32, the `cuda` target (ONNX Runtime's CUDA execution provider, when this onnxruntime has it) on
its fp32 export, and, as the reference of the same run, the `cpu` target on that export. A target that cannot run
records its one-line error instead of figures. Run from the repository root:

    python benchmarks/gpu_check.py runs/gpu-check [--quick]

`--quick` (a check of the script on any machine, run by the suite on the CPU): the 256M shape at 1 vision and 1
decoder layer, vqa-tiny for 4 steps instead of vqa-small, few timing runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402
from test_generative import smolvlm_256m_folder  # noqa: E402  (the test suite's builder, at full depth here)

from vlmedge import families  # noqa: E402
from vlmedge.errors import VlmedgeError  # noqa: E402
from vlmedge.runtime.measure import MeasureConfig  # noqa: E402
from vlmedge.targets import get_target  # noqa: E402


def vlmedge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vlmedge", *args, "--quiet"], check=True, cwd=ROOT)


def timed(target: str, path: Path, cfg: MeasureConfig, **options) -> dict:
    t0 = time.perf_counter()
    try:
        record = get_target(target)(path, cfg, **options)
    except (VlmedgeError, RuntimeError) as e:
        return {"error": str(e).splitlines()[0]}
    keep = ("vision", "ttft", "decode", "answer", "tokens_per_s", "device", "precision", "providers", "threads")
    return {**{k: record[k] for k in keep if k in record}, "seconds": round(time.perf_counter() - t0, 1)}


def main(out: Path, quick: bool) -> int:
    import torch

    run = Provenance.start()
    out.mkdir(parents=True, exist_ok=True)
    # one global 512 px frame per image, as the CPU figures of the 256M shape in the README
    cfg = families.configure(MeasureConfig, {"warmup": 2, "min_runs": 5 if quick else 20,
                                             "min_seconds": 0.2 if quick else 2.0, "image_splitting": "off"}, None)
    cuda = torch.cuda.is_available()
    result: dict = {"cuda": torch.cuda.get_device_name() if cuda else None,
                    "quick": quick, "models": {}}
    models = {"vqa-small": out / "vqa-small", "smolvlm-256m": out / "smolvlm-256m"}
    t0 = time.perf_counter()
    if not (models["vqa-small"] / "config.json").is_file():
        vlmedge("train", "--preset", "vqa-tiny" if quick else "vqa-small", "--steps", "4" if quick else "300",
                "--data-count", "256" if quick else "20000", "--out", str(models["vqa-small"]))
    if not (models["smolvlm-256m"] / "config.json").is_file():
        models["smolvlm-256m"].mkdir(parents=True, exist_ok=True)
        smolvlm_256m_folder(models["smolvlm-256m"], vision_layers=1 if quick else 12, text_layers=1 if quick else 30)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    for name, model in models.items():
        export = out / f"{name}-onnx"
        t = time.perf_counter()
        exported = None
        if not (export / "manifest.json").is_file():
            try:
                vlmedge("export", str(model), "--out", str(export), "--no-eval", "--no-tune-threads",
                        "--parity-questions", "2")
            except subprocess.CalledProcessError as e:  # the torch rows need no export: time them anyway
                exported = {"error": f"vlmedge export exited {e.returncode} (its log is above)"}
        row = {"export_s": round(time.perf_counter() - t, 1)}
        gpu = {"torch-cuda-fp16": ("torch", model, {"device": "cuda", "dtype": "fp16"}),
               "torch-cuda-fp32": ("torch", model, {"device": "cuda", "dtype": "fp32"}),
               "cuda": ("cuda", export, {}), "cpu": ("cpu", export, {})}
        for label, (target, path, options) in gpu.items():
            if label != "cpu" and not cuda:
                row[label] = {"error": "no CUDA GPU"}
            elif path == export and exported:
                row[label] = exported
            else:
                row[label] = timed(target, path, cfg, **options)
        result["models"][name] = row
        print(json.dumps({name: {k: (v.get("answer", v) if isinstance(v, dict) else v) for k, v in row.items()}}),
              flush=True)
        # written after each model, so a run stopped by its time limit keeps what it measured
        result["seconds"] = round(time.perf_counter() - t0, 1)
        run.write(out / "gpu_check.json", result)
    print(f"written: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sys.exit(main(a.out, a.quick))
