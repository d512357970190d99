"""Intel Neural Compressor's ONNX flow (onnx-neural-compressor), run inside its own environment (runs/peers/env-inc):

    from onnx_neural_compressor.quantization import quantize, config
    quantize(model, q_model_path, config.DynamicQuantConfig())

applied to each tower of a vlmedge fp32 export (the same ONNX files vlmedge's INT8 stage starts from), with the
library's defaults. Prints one JSON line. Usage: python inc_flow.py EXPORT_DIR OUT_DIR
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    export, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    from onnx_neural_compressor.quantization import config, quantize

    manifest = json.loads((export / "manifest.json").read_text())
    files, seconds = {}, {}
    for tower, name in manifest["files"].items():
        t0 = time.perf_counter()
        target = out / f"{tower}.onnx"
        quantize(str(export / name), str(target), config.DynamicQuantConfig())
        files[tower], seconds[tower] = str(target), time.perf_counter() - t0
    print(json.dumps({"files": files, "seconds": seconds,
                      "versions": {"onnx-neural-compressor": version("onnx-neural-compressor")}}))


if __name__ == "__main__":
    main()
