#!/usr/bin/env bash
# One command on a CUDA machine (about 8 minutes): the `gpu`-marked tests, then benchmarks/gpu_check.py (the torch
# target on CUDA fp16/fp32, the cuda target, and the cpu target for reference, on the vqa-small teacher and the
# SmolVLM-256M shape), all into OUT/gpu_check.json (default runs/gpu-check). From the repository root, with vlmedge
# installed (`pip install -e .[dev]`; onnxruntime-gpu for the cuda target). `--quick` checks the script anywhere.
# On a lent machine whose own Python has an older transformers (the device tool's image: 5.17), carry 5.25 and its
# dependencies as wheels: `pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
# --platform manylinux2014_x86_64 -d .whl transformers==5.25.0` (drop numpy), then there `pip install --no-deps
# --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site:$PWD before this script.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
shift || true
mkdir -p "$out"
export HF_HUB_OFFLINE=1
set +e
python3 -m pytest -m gpu tests/test_hardware.py -q -rs -p no:cacheprovider --junitxml "$out/gpu-tests.xml" \
  | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
python3 benchmarks/gpu_check.py "$out" "$@"
python3 - "$out" "$tests_rc" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
suite = ET.parse(f"{out}/gpu-tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
path = f"{out}/gpu_check.json"
result = json.load(open(path))
result["gpu_tests"] = {**tests, "exit_code": rc}
json.dump(result, open(path, "w"), indent=2)
print(f"gpu tests: {tests}; {path}")
EOF
