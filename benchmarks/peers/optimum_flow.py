"""Hugging Face Optimum's documented CPU flow, run inside its own environment (runs/peers/env-optimum).

    optimum-cli export onnx --model MODEL --task feature-extraction OUT/fp32
    ORTQuantizer + AutoQuantizationConfig.<cpu preset>(is_static=False)  ->  OUT/int8/model_quantized.onnx

The preset follows the CPU's flags as Optimum's docs advise (avx512_vnni, avx512 or avx2). Prints one JSON line.
Usage: python optimum_flow.py MODEL_DIR OUT_DIR
"""

import json
import subprocess
import sys
import time
from pathlib import Path


def cpu_preset() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def main() -> None:
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "optimum-cli"), "export", "onnx", "--model", str(model), "--task", "feature-extraction",
                    str(out / "fp32")], check=True)
    t1 = time.perf_counter()
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    preset = cpu_preset()
    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
    quantizer = ORTQuantizer.from_pretrained(out / "fp32", file_name="model.onnx")
    quantizer.quantize(save_dir=out / "int8", quantization_config=qconfig)
    import optimum.version
    import transformers
    print(json.dumps({"preset": preset, "export_s": t1 - t0, "quantize_s": time.perf_counter() - t1,
                      "fp32": str(out / "fp32" / "model.onnx"), "int8": str(out / "int8" / "model_quantized.onnx"),
                      "versions": {"optimum": optimum.version.__version__, "transformers": transformers.__version__}}))


if __name__ == "__main__":
    main()
