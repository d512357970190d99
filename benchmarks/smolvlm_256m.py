"""A SmolVLM-256M-shaped folder at full size through vlmedge: load, export, parity, bench (torch vs cpu).

Its published sizes (vision 768 wide, 12 layers, 512 px, patch 16, pixel shuffle 4 -> 64 image tokens; a 30-layer
576-wide Llama, 9 query and 3 key/value heads), random weights and a small word-level tokenizer (the real one's
49k-token embedding is the only size that differs; no hub access here). Run from the repository root:

    python benchmarks/smolvlm_256m.py runs/smolvlm-256m

writes DIR/model, DIR/onnx and DIR/results.json (export sizes, parity, the latency records).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_generative import smolvlm_256m_folder  # noqa: E402  (the test suite's builder, at full depth here)


def vlmedge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vlmedge", *args], check=True, cwd=ROOT)


def main(out: Path) -> int:
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
    vlmedge("bench", str(model), str(onnx_dir), "--min-runs", "10", "--min-seconds", "2", "--json",
            str(out / "bench.json"))
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    sizes = {f: (onnx_dir / f).stat().st_size + sum(p.stat().st_size for p in onnx_dir.glob(f + ".data"))
             for f in manifest["files"].values()}
    results = {"parameters": manifest["parameters"], "onnx_bytes": sizes, "parity": manifest["parity"],
               "generation_parity": manifest["generation_parity"], "build_s": round(t1 - t0, 1),
               "export_s": round(t2 - t1, 1), "bench": json.loads((out / "bench.json").read_text())}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "bench"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smolvlm-256m")))
