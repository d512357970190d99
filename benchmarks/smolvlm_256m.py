"""A SmolVLM-256M-shaped folder at full size through vlmedge: load, export, parity, quantize (INT8 dynamic, INT4
MatMulNBits, FP16, mixed), and time every form against PyTorch eager in interleaved rounds.

Its published sizes (vision 768 wide, 12 layers, 512 px, patch 16, pixel shuffle 4 -> 64 image tokens; a 30-layer
576-wide Llama, 9 query and 3 key/value heads), random weights and a small word-level tokenizer (the real one's
49k-token embedding is the only size that differs; no hub access here). Run from the repository root:

    python benchmarks/smolvlm_256m.py runs/smolvlm-256m

writes DIR/model, DIR/onnx, DIR/<form> and DIR/results.json (export sizes, parity, each form's size and latency,
the 16-token answer p90 ratio of eager to the best form). Its weights are random: latency and size only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

from generative import time_interleaved  # noqa: E402  (the peers' interleaved timing)
from test_generative import smolvlm_256m_folder  # noqa: E402  (the test suite's builder, at full depth here)


def vlmedge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vlmedge", *args], check=True, cwd=ROOT)


def main(out: Path, rounds: int = 3) -> int:
    out.mkdir(parents=True, exist_ok=True)
    model, onnx_dir = out / "model", out / "onnx"
    t0 = time.perf_counter()
    if not (model / "config.json").is_file():
        model.mkdir(exist_ok=True)
        smolvlm_256m_folder(model, vision_layers=12, text_layers=30)
    t1 = time.perf_counter()
    if not (onnx_dir / "manifest.json").is_file():
        vlmedge("export", str(model), "--out", str(onnx_dir), "--no-eval", "--parity-questions", "10")
    t2 = time.perf_counter()
    forms = {"int8": ["--mode", "dynamic"],
             "int4": ["--mode", "int4", "--graph", "vision=dynamic", "--block-size", "32"],
             "int4-acc4": ["--mode", "int4", "--graph", "vision=dynamic", "--block-size", "32", "--accuracy-level", "4"],
             "mixed": ["--mode", "mixed", "--block-size", "32", "--accuracy-level", "4"],
             "fp16": ["--mode", "fp16"]}
    quantize_s = {}
    for name, flags in forms.items():
        if not (out / name / "manifest.json").is_file():
            t = time.perf_counter()
            # random weights: no answer agreement to speak of; 2 x 2 calibration images for the drift cosines
            vlmedge("quantize", str(onnx_dir), "--out", str(out / name), "--no-eval", "--no-tune-threads",
                    "--agreement-questions", "0", "--calibration-batches", "2", "--batch-size", "2", *flags)
            quantize_s[name] = round(time.perf_counter() - t, 1)
    results = {"parameters": json.loads((onnx_dir / "manifest.json").read_text())["parameters"],
               "build_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1), "quantize_s": quantize_s,
               **interleaved(model, {"fp32": onnx_dir, **{n: out / n for n in forms}}, rounds)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "rounds"}, indent=2))
    return 0


def interleaved(model: Path, folders: dict[str, Path], rounds: int) -> dict:
    """PyTorch eager and every ONNX form, each once per round (vision, ttft, decode, 16-token answer; 2 threads),
    p50 / p90 as the median over rounds; sizes; the eager answer p90 over the best form's."""
    import torch

    from vlmedge import families
    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.runtime.onnx import onnx_size, read_manifest

    torch.set_num_threads(2)
    family = families.of(model)
    vlm = family.load(model)
    cfg = MeasureConfig(warmup=1, min_runs=3, min_seconds=0.0, threads=2)
    inputs = family.latency_inputs(family.adapter(folders["fp32"]), 1)
    table = time_interleaved(family, {"torch eager fp32": vlm}, folders, inputs, cfg, rounds)
    for name, folder in folders.items():
        m = read_manifest(folder)
        table[name].update({"size_bytes": onnx_size(folder), "precision": m.get("precision"),
                            "graphs": (m.get("quantization") or {}).get("graphs")})
    best = min(folders, key=lambda n: table[n]["answer"]["p90_ms"])
    return {"threads": 2, "rounds": rounds, "measure": {"warmup": 1, "min_runs": 3}, "forms": table,
            "best_form": best, "answer_p90_eager_over_best": table["torch eager fp32"]["answer"]["p90_ms"] /
            table[best]["answer"]["p90_ms"]}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smolvlm-256m")))
